//! The audit trail: every mutating API call, as one structured log line
//! (target `audit`) and one JSON object in the region's store under
//! `audit/<YYYY-MM-DD>/<time>-<instance>-<uuid>.json`, read back newest
//! first by `GET /v1/audit` and `ferry audit`.
//!
//! Invariant: an entry is written once, by the JobManager that carried the
//! call out (a standby that forwards a call leaves it to the leader), and
//! never changed; a store that cannot take it costs a warning and a count
//! (`ferry_audit_write_failures_total`), never the call.

use std::time::Duration;

use ferry_core::api::AuditEntry;
use futures::StreamExt;

use crate::error::JmError;
use crate::service::JobManager;

/// Directory of the trail in the job store.
const AUDIT_DIR: &str = "audit";
/// Most entries one read returns.
pub const MAX_ENTRIES: usize = 1000;
/// Days looked back for entries.
const MAX_DAYS: usize = 400;
/// Largest entry read back, in bytes (a corrupt object must not be big).
const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// How long writing one entry may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

impl JobManager {
    /// Logs `e` and keeps it in the store.
    pub async fn audit(&self, e: AuditEntry) {
        tracing::info!(
            target: "audit",
            actor = %e.actor,
            auth = %e.auth,
            action = %e.action,
            job = e.job.as_deref().unwrap_or(""),
            region = e.region.as_deref().unwrap_or(""),
            status = e.status,
            result = %e.result,
            "audit"
        );
        let Ok(store) = self.store() else {
            return;
        };
        let key = format!(
            "{AUDIT_DIR}/{}/{}-{}-{}.json",
            e.at.format("%Y-%m-%d"),
            e.at.format("%Y%m%dT%H%M%S%.6fZ"),
            safe(self.instance_id()),
            uuid::Uuid::now_v7().simple()
        );
        let body = match serde_json::to_vec(&e) {
            Ok(b) => bytes::Bytes::from(b),
            Err(_) => return,
        };
        let failed = match tokio::time::timeout(WRITE_TIMEOUT, store.put(&key, body)).await {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(_) => Some(format!("no answer within {WRITE_TIMEOUT:?}")),
        };
        if let Some(why) = failed {
            self.inner.metrics.audit_write_failed();
            tracing::warn!(action = %e.action, actor = %e.actor, "the audit entry could not be kept in the store ({why}); it is in this log line only");
        }
    }

    /// The newest `limit` entries of the trail (at most [`MAX_ENTRIES`]),
    /// newest first. Objects that are not entries are skipped with a
    /// warning.
    pub async fn audit_entries(&self, limit: usize) -> Result<Vec<AuditEntry>, JmError> {
        let limit = limit.clamp(1, MAX_ENTRIES);
        let store = self.store()?;
        let mut days = store.list_dirs(AUDIT_DIR).await?;
        days.sort_unstable_by(|a, b| b.cmp(a));
        let mut keys = Vec::new();
        for day in days.iter().take(MAX_DAYS) {
            let dir = format!("{AUDIT_DIR}/{day}");
            let mut files = store.list_files(&dir).await?;
            files.sort_unstable_by(|a, b| b.0.cmp(&a.0));
            for (name, size) in files {
                if size as usize <= MAX_ENTRY_BYTES && name.ends_with(".json") {
                    keys.push(format!("{dir}/{name}"));
                } else {
                    tracing::warn!(object = %format!("{dir}/{name}"), size, "skipping an object of the audit trail that is not an entry");
                }
                if keys.len() >= limit {
                    break;
                }
            }
            if keys.len() >= limit {
                break;
            }
        }
        let store = &store;
        let read: Vec<Option<AuditEntry>> = futures::stream::iter(keys)
            .map(|k| async move {
                match store.get_opt(&k).await {
                    Ok(Some(b)) => match serde_json::from_slice::<AuditEntry>(&b) {
                        Ok(e) => Some(e),
                        Err(err) => {
                            tracing::warn!(object = %k, "skipping an unreadable audit entry: {err}");
                            None
                        }
                    },
                    Ok(None) => None,
                    Err(err) => {
                        tracing::warn!(object = %k, "skipping an audit entry the store did not return: {err}");
                        None
                    }
                }
            })
            .buffered(16)
            .collect()
            .await;
        Ok(read.into_iter().flatten().collect())
    }
}

/// `s` with every character but letters, digits, `-` and `_` as `_` (an
/// instance id in an object key).
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
