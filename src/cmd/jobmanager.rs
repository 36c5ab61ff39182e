//! `ferry jobmanager --config FILE`: one JobManager of a region. It
//! heartbeats into the region's NATS KV, competes for the leader lease, and
//! serves the REST API: the leader drives every job of the job store; a
//! standby answers reads from the store and forwards writes to the leader.
//! SIGTERM or Ctrl-C hands the leadership over at once (jobs are stopped
//! here and the lease released, so a standby resumes them without waiting
//! for the lease to expire).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ferry_core::config::ProcessConfig;
use ferry_ha::nats::NatsKv;
use ferry_ha::{Coordination, ElectorConfig, MembershipConfig};
use ferry_jobmanager::ha::HaSettings;
use ferry_jobmanager::leadership::{HaContext, Leadership};
use ferry_jobmanager::{JobManager, JobManagerConfig};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct JobManagerArgs {
    /// Config file (YAML; see docs/config.md). Every key can also come from
    /// a FERRY_* environment variable, which wins over the file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

pub fn run(args: JobManagerArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(&args.log_format, false);
    let text = match &args.config {
        Some(p) => Some((
            p.display().to_string(),
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?,
        )),
        None => None,
    };
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("FERRY_"))
        .collect();
    let cfg = ProcessConfig::load(text.as_ref().map(|(n, t)| (n.as_str(), t.as_str())), &env)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-jm")
        .build()?;
    // Lease renewals and heartbeats get a runtime of their own: however busy
    // the jobs keep the main one, a renewal is never late because of them.
    let ha_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("ferry-ha")
        .build()?;
    let code = rt.block_on(run_async(cfg, ha_rt.handle().clone()));
    ha_rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "jm".to_string());
    format!("{host}-{}", std::process::id())
}

async fn run_async(cfg: ProcessConfig, ha_rt: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let instance_id = cfg.instance_id.clone().unwrap_or_else(default_instance_id);
    let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
        .await
        .with_context(|| format!("cannot listen on api.listen {}", cfg.api.listen))?;
    let bound = listener.local_addr()?.to_string();
    let api_url = cfg.advertised_url(&bound);
    let h = &cfg.ha;
    // Values in the bucket live as long as the longest-lived key needs.
    let max_age = h.member_expiry.get().max(h.lease_ttl.get()) * 2;
    tracing::info!(urls = %cfg.nats.urls.join(","), bucket = %cfg.bucket(), "connecting to NATS");
    // NATS may come up after us (a rolling start, a cluster still electing
    // its JetStream leader): keep trying, say why, stop on a signal.
    let mut attempt = 0u32;
    let bucket = cfg.bucket();
    let kv = loop {
        attempt += 1;
        // Connected from the HA runtime, so the client's I/O tasks live there.
        let (urls, b, replicas) = (cfg.nats.urls.clone(), bucket.clone(), cfg.nats.replicas);
        let open = async {
            ha_rt
                .spawn(async move { NatsKv::connect(&urls, &b, max_age, replicas).await })
                .await
                .map_err(|e| ferry_ha::HaError::Unavailable(format!("connect task: {e}")))?
        };
        tokio::select! {
            r = open => match r {
                Ok(kv) => break kv,
                Err(e) => {
                    let wait = std::time::Duration::from_millis(500 * u64::from(attempt.min(10)));
                    tracing::warn!(
                        attempt,
                        "cannot open the coordination bucket {} on NATS {} ({e}); is nats-server running with JetStream (-js)? retrying in {wait:?}",
                        cfg.bucket(),
                        cfg.nats.urls.join(",")
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown_signal() => return Ok(ExitCode::from(1)),
                    }
                }
            },
            _ = shutdown_signal() => return Ok(ExitCode::from(1)),
        }
    };
    let backend: Arc<dyn Coordination> = Arc::new(kv);
    let leadership = Leadership::ha(HaContext {
        backend: backend.clone(),
        region: cfg.region.clone(),
        member_expiry: h.member_expiry.get(),
        heartbeat_failures: Default::default(),
    });
    let jm = JobManager::with_leadership(
        JobManagerConfig {
            data_url: cfg.storage.clone(),
            instance_id: instance_id.clone(),
        },
        leadership,
    );
    let settings = HaSettings {
        region: cfg.region.clone(),
        instance_id: instance_id.clone(),
        api_url: api_url.clone(),
        membership: MembershipConfig {
            interval: h.heartbeat_interval.get(),
            expiry: h.member_expiry.get(),
        },
        elector: ElectorConfig {
            key: "leader".to_string(),
            holder: instance_id.clone(),
            ttl: h.lease_ttl.get(),
            renew_interval: h.renew_interval.get(),
            renew_deadline: h.renew_deadline.get(),
        },
        min_instances: h.min_instances_for_election,
    };
    settings
        .elector
        .validate()
        .map_err(|e| anyhow::anyhow!("ha timing: {e}"))?;
    let api_stop = CancellationToken::new();
    let api = tokio::spawn(ferry_jobmanager::api::serve(
        jm.clone(),
        listener,
        api_stop.clone(),
    ));
    tracing::info!(instance = %instance_id, region = %cfg.region, api = %api_url, listen = %bound, "jobmanager started");
    let ha_stop = CancellationToken::new();
    let ha = ha_rt.spawn(ferry_jobmanager::ha::run(
        jm.clone(),
        backend,
        settings,
        ha_stop.clone(),
    ));
    shutdown_signal().await;
    tracing::info!("stopping: handing the leadership over");
    ha_stop.cancel();
    let _ = ha.await;
    api_stop.cancel();
    let _ = api.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
