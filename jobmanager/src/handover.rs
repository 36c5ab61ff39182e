//! Leadership operations: what this JobManager does when its role changes.
//! A new leader adopts every job of the job store ([`JobManager::lead`]), a
//! leader that loses the lease stops driving at once
//! ([`JobManager::step_down`]), a standby mirrors the store for reads
//! ([`JobManager::refresh_from_store`]), and a region that loses or wins the
//! primary role demotes or promotes its jobs.
//!
//! Invariant: a JobManager drives a job only while it leads: adoption stops
//! as soon as the fence is gone, and stepping down abandons every driven
//! job (writing nothing) before it returns.

use std::sync::Arc;

use crate::error::JmError;
use crate::job::JobEntry;
use crate::model::SubmitOptions;
use crate::service::JobManager;
use crate::store::read_store;

impl JobManager {
    /// Takes over every job of the job store after winning the leadership
    /// at `epoch`: jobs that had not ended are resumed from their newest
    /// verified checkpoint; ended ones are listed. Returns how many resumed.
    pub async fn lead(&self, epoch: ferry_core::JmEpoch) -> Result<usize, JmError> {
        // The HA loop adopts on winning the lease while the region
        // coordinator may promote at the same moment: one at a time, so
        // the second finds every job driven.
        let _adopting = self.inner.adopting.lock().await;
        let stored = read_store(&self.store()?, |_| None).await?;
        let mut resumed = 0;
        for (spec, status) in stored {
            if self.inner.leadership.fence().is_none() {
                break;
            }
            let id = status.job.id;
            let driven = self
                .inner
                .entry(&id)
                .is_some_and(|j| j.driven() && !j.abandon.is_cancelled());
            if driven {
                continue;
            }
            let root = self.storage_root(&spec)?;
            // A standby region's store holds replicated jobs: they run
            // only in the primary region.
            // A job a switchover moved away is CANCELLED here but resumes
            // when this region is primary again.
            let passive = (status.job.state.is_terminal() && status.job.moved_to.is_none())
                || self.inner.standby().is_some();
            let opts = SubmitOptions {
                job_id: Some(id),
                from_savepoint: None,
                resume: true,
            };
            if !passive {
                tracing::info!(job = %id, name = %spec.metadata.name, %epoch, state = %status.job.state, "adopting job: resuming it from its newest checkpoint");
                resumed += 1;
            }
            self.start(spec, root, opts, Some((status, passive)))?;
        }
        Ok(resumed)
    }

    /// Stops driving every job at once, writing nothing (the leadership is
    /// lost or being handed over): the next leader resumes them from their
    /// checkpoints. Returns once the drivers have let go of their tasks.
    pub async fn step_down(&self) {
        let jobs: Vec<Arc<JobEntry>> = self.inner.all();
        let mut waits = Vec::new();
        for job in jobs.into_iter().filter(|j| j.driven()) {
            job.abandon.cancel();
            let mut rx = job.running.subscribe();
            waits.push(async move {
                let _ = rx.wait_for(|r| !*r).await;
            });
        }
        let n = waits.len();
        let started = std::time::Instant::now();
        if tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::future::join_all(waits),
        )
        .await
        .is_err()
        {
            tracing::error!("stepping down: some job drivers did not stop within 10 s");
        }
        if n > 0 {
            tracing::info!(
                jobs = n,
                ms = started.elapsed().as_millis() as u64,
                "stepped down: no longer driving any job"
            );
        }
    }

    /// Refreshes the list of jobs from the job store (standbys serve reads
    /// from it).
    pub async fn refresh_from_store(&self) -> Result<(), JmError> {
        let _adopting = self.inner.adopting.lock().await;
        let stored = read_store(&self.store()?, |id| self.inner.entry(id)).await?;
        for (spec, status) in stored {
            let id = status.job.id;
            let existing = self.inner.entry(&id);
            match existing {
                Some(j) if j.driven() => continue,
                Some(j) => j.mirror(status.job),
                None => {
                    let root = self.storage_root(&spec)?;
                    let opts = SubmitOptions {
                        job_id: Some(id),
                        ..SubmitOptions::default()
                    };
                    self.start(spec, root, opts, Some((status, true)))?;
                }
            }
        }
        Ok(())
    }

    /// This region lost the primary role to `primary`: every job stops here
    /// and its tasks are cancelled (not left for a next leader), nothing
    /// more is written for them, and no job is accepted. Returns once the
    /// drivers have stopped.
    #[tracing::instrument(name = "region.demote", skip(self))]
    pub async fn demote(&self, region: &str, primary: &str) {
        self.inner.region_fence.revoke();
        self.set_standby_region(region, primary);
        self.thaw_warm();
        self.inner
            .demoting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.step_down().await;
        self.inner
            .demoting
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// This region became the primary: if this instance leads its region,
    /// it starts every unfinished job of its store from its newest
    /// (replicated) checkpoint — a hot standby's held jobs from the state
    /// they hold, the others restored from the store. Returns how many it
    /// started.
    #[tracing::instrument(name = "region.promote", skip(self))]
    pub async fn promote(&self) -> Result<usize, JmError> {
        *self
            .inner
            .standby_region
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.inner.metrics.region_is_primary.set(1);
        match self.inner.leadership.fence() {
            Some(epoch) => {
                // A hot standby's held jobs start first (no restore); the
                // drivers then adopt them like any running tasks.
                let hot = self.release_held(self.inner.region_epoch.get()).await;
                if hot > 0 {
                    tracing::info!(
                        jobs = hot,
                        "promotion: jobs started from the hot standby's held state"
                    );
                }
                self.lead(epoch).await
            }
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::leadership::Leadership;
    use crate::model::JobManagerConfig;
    use crate::service::JobManager;
    use crate::store::read_store;

    fn jm(dir: &std::path::Path, id: &str) -> JobManager {
        JobManager::with_leadership(
            JobManagerConfig {
                data_url: format!("file://{}", dir.display()),
                instance_id: id.into(),
                access: ferry_core::access::AccessPolicy::unrestricted(),
            },
            Leadership::embedded(),
        )
    }

    /// Found by `ferry chaos` (seed 20261205, round 3): a JobManager that
    /// won the lease adopted the job store from its HA loop while the
    /// region coordinator promoted the region and adopted it too; both
    /// had waited on the same slow store read, found every job undriven
    /// and started each twice — two deployments of one job ran at once
    /// and its output was duplicated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_adoptions_at_once_start_each_job_once() {
        const JOBS: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = jm(&data, "jm-a");
        for i in 0..JOBS {
            let spec = format!(
                r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: adopt-{i}}}
spec:
  parallelism: 1
  source:
    generator:
      total: 1000000
      rate: 100
      eventTime: {{step: 10ms}}
      fields:
        user: {{type: key, cardinality: 10, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: "{}"}}
"#,
                dir.path().join(format!("out-{i}")).display()
            );
            first.submit(&spec).await.expect("submit");
        }
        // Every job is in the store, then its leader goes away.
        let limit = Instant::now() + Duration::from_secs(20);
        loop {
            let stored = read_store(&first.store().unwrap(), |_| None).await.unwrap();
            if stored.len() == JOBS {
                break;
            }
            assert!(
                Instant::now() < limit,
                "{} of {JOBS} jobs stored",
                stored.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.step_down().await;

        // Both on threads of their own, as the HA loop and the region
        // coordinator run.
        let next = jm(&data, "jm-b");
        let epoch = ferry_core::JmEpoch(2);
        let (x, y) = (next.clone(), next.clone());
        let a = tokio::spawn(async move { x.lead(epoch).await });
        let b = tokio::spawn(async move { y.lead(epoch).await });
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!(a + b, JOBS, "each job resumed exactly once ({a} + {b})");
        next.step_down().await;
    }
}
