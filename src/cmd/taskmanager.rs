//! `ferry taskmanager --config FILE`: one TaskManager of a region. It
//! offers task slots, heartbeats into the region's NATS KV (its record
//! carries its gRPC and exchange addresses and slots, which is how the
//! leading JobManager finds it), runs the job deployments the leader sends
//! it over gRPC — whole jobs, or parts of jobs spread over TaskManagers
//! whose records cross its exchange port — and keeps them running when the
//! leader changes. `/healthz`, `/readyz` and
//! `/metrics` are served on `taskmanager.httpListen`. SIGTERM or Ctrl-C
//! stops its tasks and removes its membership record, so the leader moves
//! its jobs to other TaskManagers at once.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use chrono::Utc;
use ferry_core::config::ProcessConfig;
use ferry_core::tls::{ClientAuth, ClientTls, Connector, ServerTls};
use ferry_ha::{Member, Membership, MembershipConfig};
use ferry_taskmanager::http::TmMetrics;
use ferry_taskmanager::link::{Exchange, LinkConfig};
use ferry_taskmanager::server::TaskManager;
use tokio_util::sync::CancellationToken;

use super::process::{
    ProcessArgs, connect_coordination, default_instance_id, run_process, stop_on_signal,
};

/// The key of the region's leader lease (the JobManagers' elector).
const LEADER_KEY: &str = ferry_jobmanager::ha::LEADER_KEY;

/// Role name of TaskManagers in membership records.
const ROLE: &str = ferry_jobmanager::taskmanagers::TASKMANAGER_ROLE;

/// `ferry taskmanager`: run one (with `--config`), or drain one.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TaskmanagerArgs {
    #[command(subcommand)]
    command: Option<TmCommand>,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(clap::Subcommand, Debug)]
enum TmCommand {
    /// Drain a TaskManager: the leader moves its jobs to other
    /// TaskManagers (stop-with-savepoint, then restore) and places nothing
    /// new on it. `--local` drains the TaskManager on this host through
    /// its HTTP port (the pod's preStop hook).
    Drain(DrainArgs),
}

#[derive(clap::Args, Debug)]
struct DrainArgs {
    /// The TaskManager's instance id (`ferry cluster status` lists them);
    /// not with --local.
    #[arg(required_unless_present = "local", conflicts_with = "local")]
    id: Option<String>,
    /// Drain the TaskManager listening on this host (its HTTP port, see
    /// --http): what a Kubernetes preStop hook runs.
    #[arg(long)]
    local: bool,
    /// The local TaskManager's HTTP address (with --local).
    #[arg(long, default_value = "http://127.0.0.1:9249", requires = "local")]
    http: String,
    /// Wait until the TaskManager runs no job any more.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// End a drain instead: the TaskManager takes new jobs again.
    #[arg(long, conflicts_with_all = ["local", "wait"])]
    cancel: bool,
    #[command(flatten)]
    api: super::job::ApiArgs,
}

pub fn run(args: TaskmanagerArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(TmCommand::Drain(d)) => drain(d),
        None => run_process(args.process, "ferry-tm", run_async),
    }
}

fn drain(d: DrainArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if d.local {
            return drain_local(&d).await;
        }
        let id = d.id.clone().unwrap_or_default();
        let c = super::job::client(&d.api)?;
        let call = c.drain(&id, !d.cancel).await;
        let failed = call.is_err();
        let code = super::job::show(d.api.output, call, ferry_client::text::drain);
        if failed || !d.wait {
            return Ok(code);
        }
        let deadline = std::time::Instant::now() + d.timeout;
        loop {
            let left = c
                .cluster()
                .await
                .ok()
                .and_then(|a| a.value.taskmanagers.into_iter().find(|t| t.id == id))
                .map(|t| t.jobs.len());
            match left {
                Some(0) | None => {
                    eprintln!("TaskManager {id} runs no job");
                    return Ok(ExitCode::SUCCESS);
                }
                Some(n) => eprintln!("waiting: {n} job(s) still on {id}"),
            }
            if std::time::Instant::now() >= deadline {
                eprintln!(
                    "error: {id} still runs jobs after {}: see `ferry cluster status` and the jobs' failure fields (too few free slots elsewhere?)",
                    humantime::format_duration(d.timeout)
                );
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}

/// Drains the TaskManager on this host through its HTTP port.
async fn drain_local(d: &DrainArgs) -> anyhow::Result<ExitCode> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let url = format!("{}/drain", d.http.trim_end_matches('/'));
    let r = http
        .post(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach the TaskManager at {url}"))?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        eprintln!(
            "error: {url} answered {status}: {}",
            body["message"].as_str().unwrap_or("(no message)")
        );
        return Ok(ExitCode::from(1));
    }
    eprintln!(
        "draining TaskManager {} ({} deployment(s))",
        body["taskmanager"].as_str().unwrap_or("?"),
        body["deployments"]
    );
    if !d.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = std::time::Instant::now() + d.timeout;
    loop {
        let left = match http.get(&url).send().await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        match left.as_ref().and_then(|v| v["deployments"].as_u64()) {
            Some(0) => {
                eprintln!("drained: no deployment left");
                return Ok(ExitCode::SUCCESS);
            }
            Some(n) => eprintln!("waiting: {n} deployment(s) left"),
            None => eprintln!("waiting: {url} does not answer"),
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "error: still not drained after {}",
                humantime::format_duration(d.timeout)
            );
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn run_async(cfg: ProcessConfig, ha_rt: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let signal = stop_on_signal();
    let t = &cfg.taskmanager;
    let id = cfg
        .instance_id
        .clone()
        .unwrap_or_else(|| default_instance_id("tm"));
    // Certificates first: a missing or broken file stops the process at
    // once, naming the file.
    let grpc_tls = match &cfg.tls.grpc {
        Some(tls) => Some(ServerTls::load(
            tls.files(),
            match &tls.client_name {
                Some(name) => ClientAuth::RequiredNamed(name.clone()),
                None => ClientAuth::Required,
            },
            &[b"h2"],
            cfg.tls.reload_interval.get(),
        )?),
        None => None,
    };
    // The exchange: the same certificate both ways. Its clients are other
    // TaskManagers: with tls.grpc.serverName set, only certificates
    // carrying that name (the TaskManagers') get in.
    let exchange_tls = match &cfg.tls.grpc {
        Some(tls) => Some((
            ServerTls::load(
                tls.files(),
                match &tls.server_name {
                    Some(name) => ClientAuth::RequiredNamed(name.clone()),
                    None => ClientAuth::Required,
                },
                &[b"h2"],
                cfg.tls.reload_interval.get(),
            )?,
            Connector::new(
                ClientTls::load(tls.files(), &[b"h2"], cfg.tls.reload_interval.get())?,
                tls.server_name.clone(),
            ),
        )),
        None => None,
    };
    let grpc = tokio::net::TcpListener::bind(&t.listen)
        .await
        .with_context(|| format!("cannot listen on taskmanager.listen {}", t.listen))?;
    let grpc_bound = grpc.local_addr()?.to_string();
    let url = cfg.taskmanager_url(&grpc_bound);
    let exchange_listen = cfg.exchange_listen();
    let exchange_listener = tokio::net::TcpListener::bind(&exchange_listen)
        .await
        .with_context(|| {
            format!("cannot listen on taskmanager.exchangeListen {exchange_listen}")
        })?;
    let exchange_url = cfg.exchange_url(&exchange_listener.local_addr()?.to_string());
    let http = tokio::net::TcpListener::bind(&t.http_listen)
        .await
        .with_context(|| format!("cannot listen on taskmanager.httpListen {}", t.http_listen))?;
    let http_bound = http.local_addr()?.to_string();
    ferry_taskmanager::state::configure_from(
        t.state_memory.map(|m| m.as_u64()),
        t.state_dir.as_deref().map(std::path::Path::new),
        &id,
    )
    .map_err(|e| anyhow::anyhow!("taskmanager.stateMemory: {e}"))?;
    let tm = TaskManager::new(id.clone(), t.slots);
    let (exchange_server_tls, exchange_client_tls) = match exchange_tls {
        Some((s, c)) => (Some(s), Some(c)),
        None => (None, None),
    };
    let exchange = Exchange::new(
        id.clone(),
        LinkConfig {
            credits: t.exchange_credits,
            ..LinkConfig::default()
        },
        exchange_client_tls,
    );
    tm.set_exchange(exchange.clone());
    let fence_stop = CancellationToken::new();
    let fence = tokio::spawn(tm.clone().watch_fence(fence_stop.clone()));

    let http_stop = CancellationToken::new();
    let metrics = Arc::new(TmMetrics::new(&tm));
    let http_task = tokio::spawn(ferry_taskmanager::http::serve(
        http,
        metrics.clone(),
        http_stop.clone(),
    ));

    let Some(backend) = connect_coordination(&cfg, &ha_rt, &signal).await else {
        return Ok(ExitCode::from(1));
    };
    // A newer JobManager epoch is believed only once the region's leader
    // lease shows it (read on the coordination runtime, where the NATS
    // client lives).
    {
        let (backend, rt) = (backend.clone(), ha_rt.clone());
        tm.confirm_epochs_with(Arc::new(move || {
            let (backend, rt) = (backend.clone(), rt.clone());
            Box::pin(async move {
                rt.spawn(async move { ferry_ha::read_leader(&*backend, LEADER_KEY).await })
                    .await
                    .map_err(|e| format!("the lease read stopped: {e}"))?
                    .map(|l| l.map(|l| l.epoch))
                    .map_err(|e| e.to_string())
            })
        }));
    }

    // Serve gRPC before joining the membership: once the leader sees the
    // record it dials at once.
    let grpc_stop = CancellationToken::new();
    let grpc_task = serve(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(tm.service()),
        grpc,
        grpc_tls,
        metrics.tls_handshake_failures.clone(),
        grpc_stop.clone(),
    );
    let exchange_stop = CancellationToken::new();
    let exchange_task = serve(
        Exchange::server_builder().add_service(exchange.service()),
        exchange_listener,
        exchange_server_tls,
        metrics.tls_handshake_failures.clone(),
        exchange_stop.clone(),
    );
    tracing::info!(taskmanager = %id, region = %cfg.region, slots = t.slots, grpc = %url, exchange = %exchange_url, tls = cfg.tls.grpc.is_some(), http = %http_bound, "taskmanager started; joining the region");

    let member = Member {
        id: id.clone(),
        role: ROLE.to_string(),
        region: cfg.region.clone(),
        address: url,
        slots: t.slots,
        started_at: Utc::now(),
        exchange: Some(exchange_url),
    };
    let heartbeat_stop = CancellationToken::new();
    let (membership, heartbeat) = {
        let (backend, stop) = (backend.clone(), heartbeat_stop.clone());
        let mcfg = MembershipConfig {
            interval: cfg.ha.heartbeat_interval.get(),
            expiry: cfg.ha.member_expiry.get(),
        };
        // Spawned from the coordination runtime so the heartbeat lives there.
        ha_rt
            .spawn(async move { Membership::spawn(backend, mcfg, member, stop) })
            .await?
    };
    metrics.set_heartbeat_failures(membership.failures.clone());
    metrics.ready.store(true, Ordering::Relaxed);

    signal.cancelled().await;
    if t.drain_on_shutdown {
        // The leader moves the jobs by savepoint while this TaskManager
        // keeps running them; it stops once they are gone (or the drain
        // timeout passes: then they restart elsewhere from checkpoints).
        tm.set_draining(true);
        let limit = t.drain_timeout.get();
        tracing::info!(timeout = %humantime::format_duration(limit), "stopping: draining first (taskmanager.drainOnShutdown)");
        let left = tm.wait_drained(limit).await;
        if left > 0 {
            tracing::warn!(
                deployments = left,
                "the drain did not finish within taskmanager.drainTimeout: stopping the rest (their jobs restart elsewhere from their checkpoints)"
            );
        } else {
            tracing::info!("drained: no deployment left");
        }
    }
    tracing::info!("stopping: leaving the region and stopping every task");
    metrics.ready.store(false, Ordering::Relaxed);
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    tm.shutdown().await;
    fence_stop.cancel();
    let _ = fence.await;
    grpc_stop.cancel();
    exchange_stop.cancel();
    for (what, task) in [("gRPC", grpc_task), ("exchange", exchange_task)] {
        match task.await {
            Ok(Err(e)) => tracing::warn!("{what} server ended with an error: {e}"),
            Err(e) => tracing::warn!("{what} server task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    http_stop.cancel();
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Serves `router` on `listener` until `stop`: over TLS when `tls` is set
/// (a refused handshake counted in `failures`), else plaintext — without
/// Nagle's delay either way: tonic's `tcp_nodelay` does not reach
/// connections served from a listener of our own, and each message would
/// wait for the peer's delayed ACK.
fn serve(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    failures: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let stopped = async move { stop.cancelled().await };
    match tls {
        Some(tls) => {
            let incoming = ferry_core::tls::incoming(
                listener,
                tls,
                Arc::new(move || {
                    failures.fetch_add(1, Ordering::Relaxed);
                }),
            );
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        None => {
            tokio::spawn(router.serve_with_incoming_shutdown(Exchange::incoming(listener), stopped))
        }
    }
}
