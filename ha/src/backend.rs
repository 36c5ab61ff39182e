//! The coordination backend trait: one key-value bucket with revisions,
//! create-if-absent, compare-and-set update and delete, listing and watching.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use thiserror::Error;

/// A stored value and the revision that wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    /// Strictly increasing over the whole bucket, also across deletes.
    pub revision: u64,
    /// When the value was written (the backend's clock).
    pub created: SystemTime,
}

/// A change seen by a watcher.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Put(Entry),
    /// Deleted, purged or expired.
    Gone {
        key: String,
        revision: u64,
    },
}

/// Errors of coordination operations.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum HaError {
    #[error("key '{0}' already exists")]
    Exists(String),
    #[error("key '{0}' changed since revision {1} (compare-and-set lost)")]
    WrongRevision(String, u64),
    #[error("coordination backend unavailable: {0}")]
    Unavailable(String),
}

/// One bucket of a coordination backend. Keys are dot-separated tokens of
/// `[A-Za-z0-9_-]`, e.g. `leader` or `members.jm-1`.
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// The current entry, if any. May be stale on a replicated backend: use
    /// it for display and hints, never to decide ownership.
    async fn get(&self, key: &str) -> Result<Option<Entry>, HaError>;
    /// Writes `value` only if `key` has no live value; returns the revision.
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, HaError>;
    /// Writes `value` only if the key's last revision is `revision`.
    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, HaError>;
    /// Writes `value` unconditionally.
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, HaError>;
    /// Deletes `key`, only at `revision` if given.
    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), HaError>;
    /// Live entries whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, HaError>;
    /// Changes to `key`, or to every key below `prefix.` when `key` ends
    /// with `.`. The current value (if any) comes first.
    async fn watch(&self, key: &str) -> Result<BoxStream<'static, Event>, HaError>;
    /// How long an unrefreshed value lives in this bucket.
    fn max_age(&self) -> Duration;
}

/// Checks a key against the rules every backend accepts.
pub fn check_key(key: &str) -> Result<(), HaError> {
    let ok = !key.is_empty()
        && key.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(HaError::Unavailable(format!(
            "invalid key '{key}': use dot-separated tokens of letters, digits, '_' and '-'"
        )))
    }
}
