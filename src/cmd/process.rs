//! What `ferry jobmanager` and `ferry taskmanager` share: loading the
//! config (file + `FERRY_*`), the instance id, opening the region's
//! coordination bucket on NATS (retried until reachable), and the shutdown
//! signal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_core::config::ProcessConfig;
use ferry_ha::Coordination;
use tokio_util::sync::CancellationToken;

/// The flags of `ferry jobmanager` and `ferry taskmanager`.
#[derive(clap::Args, Debug)]
pub struct ProcessArgs {
    /// Config file (YAML; see docs/config.md). Every key can also come from
    /// a FERRY_* environment variable, which wins over the file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
    /// Listen beyond loopback without TLS and authentication (anyone who
    /// reaches the port may then command this process). Without it, such a
    /// config is refused at start.
    #[arg(long)]
    pub insecure: bool,
}

/// Sets up logging and the config, then runs `main` on a runtime named
/// `thread_name` with a second, small runtime for heartbeats and lease
/// renewals (however busy the jobs keep the main one, a heartbeat is never
/// late because of them).
pub fn run_process<F>(
    args: ProcessArgs,
    thread_name: &str,
    main: impl FnOnce(ProcessConfig, tokio::runtime::Handle) -> F,
) -> anyhow::Result<std::process::ExitCode>
where
    F: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    // The `service.name` of exported traces: ferry-jobmanager, ferry-taskmanager.
    let service = match thread_name {
        "ferry-jm" => "ferry-jobmanager",
        "ferry-tm" => "ferry-taskmanager",
        other => other,
    };
    super::init_logging(&args.log_format, false, service);
    let cfg = load_config(args.config.as_ref())?;
    let role = match thread_name {
        "ferry-tm" => ferry_core::config::ProcessRole::TaskManager,
        _ => ferry_core::config::ProcessRole::JobManager,
    };
    let exposed = cfg.unprotected_listeners(role);
    if !exposed.is_empty() {
        if !args.insecure {
            for e in &exposed {
                eprintln!("error: {e}");
            }
            eprintln!(
                "Set up TLS and authentication (docs/security.md), listen on a loopback address, or pass --insecure to accept the risk."
            );
            return Ok(std::process::ExitCode::from(2));
        }
        for e in &exposed {
            tracing::warn!("--insecure: {e}");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(thread_name)
        .build()?;
    let ha_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("ferry-ha")
        .build()?;
    let code = rt.block_on(main(cfg, ha_rt.handle().clone()));
    ha_rt.shutdown_timeout(Duration::from_secs(2));
    code
}

/// Reads `--config` (if given) with the `FERRY_*` variables on top.
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<ProcessConfig> {
    let text = match path {
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
    Ok(ProcessConfig::load(
        text.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        &env,
    )?)
}

/// `<hostname>-<pid>` (`fallback` when the host name is unknown).
pub fn default_instance_id(fallback: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| fallback.to_string());
    format!("{host}-{}", std::process::id())
}

/// Opens the region's coordination bucket, connecting from `ha_rt` (so the
/// client's I/O tasks live there), retrying until `stop`.
pub async fn connect_coordination(
    cfg: &ProcessConfig,
    ha_rt: &tokio::runtime::Handle,
    stop: &CancellationToken,
) -> Option<Arc<dyn Coordination>> {
    let h = &cfg.ha;
    // Values in the bucket live as long as the longest-lived key needs.
    let max_age = h.member_expiry.get().max(h.lease_ttl.get()) * 2;
    let credentials = match ferry_ha::nats::NatsCredentials::load(&cfg.nats.auth, "nats.auth")
        .and_then(|c| c.with_tls(cfg.nats.tls.as_ref(), "nats.tls"))
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return None;
        }
    };
    ferry_ha::nats::open_retrying(
        &cfg.nats.urls,
        &cfg.bucket(),
        max_age,
        cfg.nats.replicas,
        &credentials,
        ha_rt,
        stop,
    )
    .await
}

/// A token cancelled on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        s.cancel();
    });
    stop
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
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
