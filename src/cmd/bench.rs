//! `ferry bench`: the benchmarks of `ferry_lab` (see docs/benchmarks.md):
//! their flags and how their results are printed (a Markdown table, or
//! JSON with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_lab::bench::ThroughputOptions;
use ferry_lab::exchange::ExchangeOptions;
use ferry_lab::failover::FailoverOptions;
use ferry_lab::region::RegionOptions;
use ferry_lab::replication::ReplicationOptions;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchKind,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchKind {
    /// Keyed tumbling count over many keys, with and without checkpoints.
    Throughput(ThroughputArgs),
    /// Leader failover of `ferry jobmanager` processes: SIGKILL and
    /// graceful handoff times, idle CPU.
    Failover(FailoverArgs),
    /// Cross-region failover (SIGKILL of the primary region) and planned
    /// switchover times.
    Region(RegionArgs),
    /// Cross-region replication lag while a job runs.
    Replication(ReplicationArgs),
    /// Window state larger than the memory it may use: a `ferry local`
    /// process with `--state-memory` is killed after a checkpoint,
    /// restores and finishes; RSS over time, restore time, exact output.
    LargeState(LargeStateArgs),
    /// A keyed count at parallelism 2 split over two TaskManagers (records
    /// crossing the exchange) against the same job on one, same process
    /// and cores, runs interleaved; exchange throughput per CPU second.
    Exchange(ExchangeArgs),
}

#[derive(clap::Args, Debug)]
pub struct LargeStateArgs {
    /// Distinct keys (the state's size is about keys × (key bytes + 8)).
    #[arg(long, default_value_t = 16_000_000)]
    pub keys: u64,
    /// Length of each key in bytes.
    #[arg(long, default_value_t = 128)]
    pub key_bytes: usize,
    /// Records per key (the job counts them in one 24-hour window).
    #[arg(long, default_value_t = 2)]
    pub passes: u64,
    /// The process's `--state-memory`.
    #[arg(long, default_value = "512MiB")]
    pub state_memory: bytesize::ByteSize,
    #[arg(long, default_value = "10s")]
    pub checkpoint_interval: String,
    /// Kill the first run after a checkpoint holding at least this
    /// fraction of the records.
    #[arg(long, default_value_t = 0.75)]
    pub kill_at: f64,
    /// Where checkpoints, the state store and the output go (kept); a
    /// temp dir, removed at the end, by default. Needs room for about 4×
    /// the state.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Bound on each of the two runs.
    #[arg(long, default_value = "60m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Records per second of the source (0: as fast as the job goes).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print results as JSON (with the RSS samples).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ExchangeArgs {
    /// Events per run.
    #[arg(long, default_value_t = 50_000_000)]
    pub events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Runs of each variant, interleaved; the fastest of each is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Worker threads in all: the one TaskManager runs on all of them; split,
    /// each TaskManager runs on its own runtime with half (with 1, both
    /// share it).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// String keys `<prefix><n>` (e.g. `customer-`) instead of integers.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ThroughputArgs {
    /// Events per run.
    #[arg(long, default_value_t = 100_000_000)]
    pub events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Checkpoint interval of the "with checkpoints" run.
    #[arg(long, default_value = "1s")]
    pub checkpoint_interval: String,
    /// Runs of each variant, interleaved; the fastest of each is reported
    /// (interference from other work only ever adds time).
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Where checkpoints go (a temp dir by default).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// String keys `<prefix><n>` (e.g. `customer-`) instead of integers.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Size of the tumbling window (e.g. `24h`: every key's state lives
    /// through the whole run).
    #[arg(long, default_value = "1m")]
    pub window: String,
    /// Also run with full checkpoints (`checkpointing.incremental: false`)
    /// beside the incremental ones, interleaved.
    #[arg(long)]
    pub compare_full: bool,
    /// Keep window state in the local state store with this much memory
    /// (as `taskmanager.stateMemory`, e.g. `64MiB`), in a temp dir; the
    /// peak RSS is reported at the end.
    #[arg(long, value_name = "SIZE")]
    pub state_memory: Option<bytesize::ByteSize>,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Leader SIGKILLs to measure.
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Graceful handoffs (SIGTERM of the leader) to measure.
    #[arg(long, default_value_t = 20)]
    pub handoffs: u32,
    /// Seconds of idle CPU measurement at the end (0 skips it).
    #[arg(long, default_value_t = 20)]
    pub idle_seconds: u64,
    /// TaskManagers to start (0: none; then no long job runs).
    #[arg(long, default_value_t = 2)]
    pub taskmanagers: usize,
    /// Leader lease ttl of the JobManagers.
    #[arg(long, default_value = "800ms")]
    pub lease_ttl: String,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the JobManagers' logs and store in this directory (a temp dir,
    /// removed at the end, by default).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Run every link over TLS with authentication (NATS: TLS, client
    /// certificate and password; REST: HTTPS and a bearer token; gRPC:
    /// mutual TLS), with certificates made for the run.
    #[arg(long, conflicts_with = "compare_secure")]
    pub secure: bool,
    /// Run a plaintext and a `--secure` cluster side by side (REST
    /// requests and leader losses taking turns between them) and compare
    /// the p99s.
    #[arg(long)]
    pub compare_secure: bool,
    /// REST requests (`GET /v1/jobs/{id}`) to time on the leader (and a
    /// fifth as many on new connections).
    #[arg(long, default_value_t = 2000)]
    pub rest_requests: u32,
}

#[derive(clap::Args, Debug)]
pub struct RegionArgs {
    /// Unplanned failovers (SIGKILL of the primary region) to measure.
    #[arg(long, default_value_t = 10)]
    pub failovers: u32,
    /// Planned switchovers to measure.
    #[arg(long, default_value_t = 10)]
    pub switchovers: u32,
    /// Region-outage drills (`ferry drill run --scenario region-outage
    /// --revert`) to run after the failovers and switchovers: RTO, RPO and
    /// the fail-back's divergence per drill.
    #[arg(long, default_value_t = 0)]
    pub drills: u32,
    /// `regions.replication` of both regions: `async` or `sync`.
    #[arg(long, default_value = "async", value_parser = ["async", "sync"])]
    pub replication: String,
    /// Region timeout (`regions.timeout`).
    #[arg(long, default_value = "5s")]
    pub region_timeout: String,
    /// Put the regions this round trip apart, e.g. `100ms`: each gets its
    /// own regional NATS and S3-compatible store (moto under waitress,
    /// from the project's .venv), and the other region's store and global
    /// node are reached only through WAN-like links.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rtt: Option<Duration>,
    /// Bandwidth of those links, each way, in bytes per second (`100MB`,
    /// `64MiB`); unlimited by default.
    #[arg(long, requires = "rtt", value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,
    /// `regions.standby` of both regions; `cold,hot` measures both in turn
    /// in this run (fresh regions each).
    #[arg(long, default_value = "cold", value_delimiter = ',', value_parser = ["cold", "hot"])]
    pub standby: Vec<String>,
    /// Distinct keys of the job's window: its state's size (about 130
    /// bytes of TaskManager memory and 7 of checkpoint per key: 8000000
    /// hold about 1 GB). The failovers begin once the job read three
    /// records per key.
    #[arg(long, default_value_t = 100)]
    pub state_keys: u64,
    /// Records per second the job reads.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// The job's checkpoint interval.
    #[arg(long, default_value = "200ms")]
    pub checkpoint_interval: String,
    /// `regions.healthCheckInterval` of both regions.
    #[arg(long, default_value = "1s")]
    pub health_check_interval: String,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep logs and stores here (a temp dir, removed at the end, by default).
    #[arg(long)]
    pub work_dir: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ReplicationArgs {
    /// How long to measure (after --warmup).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Checkpoint interval of the job.
    #[arg(long, default_value = "1s")]
    pub checkpoint_interval: String,
    /// Events per second the job reads.
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// Primary store (a temp dir by default).
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Standby store (a temp dir by default).
    #[arg(long, value_name = "URL", conflicts_with = "rtt")]
    pub to: Option<String>,
    /// Put the standby store this round trip away: an S3-compatible
    /// server (moto under waitress, from the project's .venv) behind a
    /// WAN-like link, e.g. `100ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rtt: Option<Duration>,
    /// Bandwidth of that link, each way, in bytes per second (`100MB` =
    /// 100,000,000 per second; `MiB` for 2^20); unlimited by default.
    #[arg(long, requires = "rtt", value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,
    /// Also run the same job under synchronous replication
    /// (`regions.replication: sync`) in the same run, and compare both
    /// jobs' checkpoint durations.
    #[arg(long)]
    pub compare_sync: bool,
    /// Let the job run this long before measuring (the first full
    /// replication pass, the first synchronous copy with the job's spec,
    /// opening connections); not part of --seconds.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Distinct keys of the job's window state.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// String keys `<prefix><n>` (e.g. `customer-`) instead of integers.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Size of the job's tumbling window (e.g. `24h`: the state lives
    /// through the whole run).
    #[arg(long, default_value = "1m")]
    pub window: String,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchKind::Throughput(a) => throughput(a),
        BenchKind::Exchange(a) => exchange(a),
        BenchKind::LargeState(a) => large_state(a),
        BenchKind::Failover(a) => failover(a),
        BenchKind::Replication(a) => replication(a),
        BenchKind::Region(a) => region(a),
    }
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Prints a result as one line of JSON (keys sorted, as `serde_json`'s
/// maps keep them) with `--json`, else as its Markdown.
fn print_report<R: serde::Serialize>(
    json: bool,
    r: &R,
    markdown: impl FnOnce(&R) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_value(r)?);
    } else {
        print!("{}", markdown(r));
    }
    Ok(ExitCode::SUCCESS)
}

fn throughput(a: ThroughputArgs) -> anyhow::Result<ExitCode> {
    eprintln!(
        "keyed tumbling count: {} events, {} keys, parallelism 1, one core; best of {}",
        a.events, a.keys, a.repeat
    );
    let _state_dir = match a.state_memory {
        Some(m) => {
            let dir = tempfile::tempdir()?;
            ferry_taskmanager::state::configure_from(Some(m.as_u64()), Some(dir.path()), "bench")
                .map_err(|e| anyhow::anyhow!("--state-memory: {e}"))?;
            eprintln!(
                "window state in the local state store ({}), its memory bounded to {m}",
                dir.path().display()
            );
            Some(dir)
        }
        None => None,
    };
    let opts = ThroughputOptions {
        events: a.events,
        keys: a.keys,
        checkpoint_interval: a.checkpoint_interval.clone(),
        repeat: a.repeat,
        data_dir: a.data_dir.clone(),
        key_prefix: a.key_prefix.clone(),
        window: a.window.clone(),
        compare_full: a.compare_full,
    };
    let r = ferry_lab::bench::throughput(&opts, |n, variant, res| {
        eprintln!(
            "  run {n} {variant:<22} {:>7.2} M ev/s per core  ({:.2} s wall, {:.2} s cpu, {} checkpoints, {:.1} ms checkpoint work, {:.2} MB written per checkpoint of {:.1} MB state)",
            res.events_per_cpu_s / 1e6,
            res.wall_s,
            res.cpu_s,
            res.checkpoints,
            res.checkpoint_work_s * 1e3,
            res.written_bytes_per_checkpoint / 1e6,
            res.state_bytes as f64 / 1e6,
        );
    })?;
    if let Some(store) = ferry_taskmanager::state::process_store() {
        let (_, limit, evictions, disk) = store.usage();
        eprintln!(
            "state store: caches bounded to {:.0} MiB, written back {evictions} times, {:.0} MB on disk; peak RSS of this process {} MiB",
            limit as f64 / 1048576.0,
            disk as f64 / 1e6,
            peak_rss_kib() / 1024
        );
    }
    print_report(a.json, &r, |r| r.markdown())
}

/// This process's peak resident set (VmHWM), in KiB (0 where unknown).
fn large_state(a: LargeStateArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..1.0).contains(&a.kill_at) || a.kill_at <= 0.0 {
        anyhow::bail!("--kill-at must lie between 0 and 1");
    }
    let opts = ferry_lab::large_state::LargeStateOptions {
        ferry: std::env::current_exe()?,
        keys: a.keys,
        key_bytes: a.key_bytes,
        passes: a.passes,
        state_memory: a.state_memory.to_string(),
        checkpoint_interval: a.checkpoint_interval.clone(),
        kill_at: a.kill_at,
        dir: a.dir.clone(),
        timeout: a.timeout,
        rate: a.rate,
    };
    let r = ferry_lab::large_state::run(&opts, |line| eprintln!("{line}"))?;
    print_report(a.json, &r, |r| r.markdown())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn failover(a: FailoverArgs) -> anyhow::Result<ExitCode> {
    use ferry_lab::failover::Progress;
    let opts = FailoverOptions {
        ferry: std::env::current_exe()?,
        kills: a.kills,
        handoffs: a.handoffs,
        idle_seconds: a.idle_seconds,
        taskmanagers: a.taskmanagers,
        lease_ttl: a.lease_ttl.clone(),
        work_dir: a.work_dir.clone(),
        secure: a.secure,
        rest_requests: a.rest_requests,
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let label = |secure: bool| match (a.compare_secure, secure) {
        (false, _) => "",
        (true, false) => "plaintext ",
        (true, true) => "secure    ",
    };
    let progress = |p: Progress| match p {
        Progress::Started { secure } => eprintln!(
            "failover benchmark ({}): 3 JobManagers, {} TaskManagers, nats-server on loopback, lease ttl {}; {} REST requests, {} SIGKILLs, {} graceful handoffs{}",
            if secure {
                "TLS + authentication on every link"
            } else {
                "plaintext"
            },
            a.taskmanagers,
            a.lease_ttl,
            a.rest_requests,
            a.kills,
            a.handoffs,
            if a.compare_secure {
                "; both clusters run side by side, taking turns"
            } else {
                ""
            }
        ),
        Progress::Round {
            secure,
            handoff,
            n,
            write,
            checkpoint,
        } => eprintln!(
            "  {}{} {n:>2}: new leader accepted a write after {:>6.1} ms{}",
            label(secure),
            if handoff { "handoff" } else { "kill" },
            ms(write),
            checkpoint
                .map(|c| format!(
                    "; the running job's next checkpoint after {:>6.1} ms",
                    ms(c)
                ))
                .unwrap_or_default()
        ),
    };
    if !a.compare_secure {
        let r = current_thread()?.block_on(ferry_lab::failover::run(&opts, progress))?;
        return print_report(a.json, &r, |r| r.markdown(a.idle_seconds));
    }
    let (plain, secure) =
        current_thread()?.block_on(ferry_lab::failover::run_compared(&opts, progress))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"plaintext": plain, "secure": secure})
            )?
        );
    } else {
        println!("{}", plain.markdown(a.idle_seconds));
        println!("{}", secure.markdown(a.idle_seconds));
        println!("{}", ferry_lab::failover::compare(&plain, &secure));
    }
    Ok(ExitCode::SUCCESS)
}

fn region(a: RegionArgs) -> anyhow::Result<ExitCode> {
    let opts = RegionOptions {
        failovers: a.failovers,
        switchovers: a.switchovers,
        drills: a.drills,
        replication: a.replication.clone(),
        region_timeout: a.region_timeout.clone(),
        rtt: a.rtt,
        bandwidth: a.bandwidth,
        work_dir: a.work_dir.clone(),
        standby: a.standby.clone(),
        state_keys: a.state_keys,
        rate: a.rate,
        checkpoint_interval: a.checkpoint_interval.clone(),
        health_check_interval: a.health_check_interval.clone(),
        ..RegionOptions::new(std::env::current_exe()?)
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Multi-threaded: the WAN links (--rtt) forward bytes in this process
    // while the benchmark waits on the regions.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(ferry_lab::region::run(&opts, |p| match p {
        ferry_lab::region::Progress::Started => eprintln!(
            "region benchmark: 2 regions (JM + TM each), region timeout {}, {} replication, {} standby{}; {} failovers, {} switchovers, {} drills",
            a.region_timeout,
            a.replication,
            a.standby.join(" then "),
            a.rtt
                .map(|r| format!(", {} apart", humantime::format_duration(r)))
                .unwrap_or_default(),
            a.failovers,
            a.switchovers,
            a.drills
        ),
        ferry_lab::region::Progress::Drill { n, drill: d } => eprintln!(
            "  drill {n:>2}: {} -> {} RTO {} ms, RPO {} records in / {} out; fail-back divergence: {}{}",
            d.from,
            d.to,
            d.rto_ms.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            d.rpo_records,
            d.rpo_records_out,
            match (d.diverged_checkpoints, d.divergence_records_out) {
                (Some(c), Some(r)) => format!("{c} checkpoints, {r} records out"),
                _ => "none (the fail-back failed)".into(),
            },
            if d.failures.is_empty() {
                String::new()
            } else {
                format!("; {}", d.failures.join("; "))
            }
        ),
        ferry_lab::region::Progress::StateReady { standby, bytes } => eprintln!(
            "  standby {standby}: the job's state is built ({:.1} MB checkpoint); failovers start",
            bytes as f64 / 1e6
        ),
        ferry_lab::region::Progress::Failover {
            n,
            to,
            standby,
            promoted,
            running,
            recovered,
        } => eprintln!(
            "  failover {n:>2} ({standby}): {to} promoted after {:>7.1} ms; job running there after {:>7.1} ms, checkpointing after {:>7.1} ms",
            ms(promoted),
            ms(running),
            ms(recovered)
        ),
        ferry_lab::region::Progress::Switchover { n, to, took } => eprintln!(
            "  switchover {n:>2}: job checkpointing in {to} after {:>7.1} ms",
            ms(took)
        ),
    }))?;
    print_report(a.json, &r, |r| r.markdown())
}

fn replication(a: ReplicationArgs) -> anyhow::Result<ExitCode> {
    let opts = ReplicationOptions {
        seconds: a.seconds,
        checkpoint_interval: a.checkpoint_interval.clone(),
        rate: a.rate,
        from: a.from.clone(),
        to: a.to.clone(),
        rtt: a.rtt,
        bandwidth: a.bandwidth,
        compare_sync: a.compare_sync,
        warmup: a.warmup,
        keys: a.keys,
        key_prefix: a.key_prefix.clone(),
        window: a.window.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(ferry_lab::replication::run(&opts, |s| {
        eprintln!(
            "replication benchmark: job {} checkpoints every {} to {}, replicated to {}; {} s{}",
            s.job,
            a.checkpoint_interval,
            s.from,
            s.to,
            a.seconds,
            if a.compare_sync {
                "; the same job beside it under synchronous replication"
            } else {
                ""
            }
        )
    }))?;
    print_report(a.json, &r, |r| r.markdown())
}

fn exchange(a: ExchangeArgs) -> anyhow::Result<ExitCode> {
    let opts = ExchangeOptions {
        events: a.events,
        keys: a.keys,
        repeat: a.repeat,
        threads: a.threads,
        key_prefix: a.key_prefix,
    };
    let report = ferry_lab::exchange::exchange(&opts, |r, split, res| {
        let crossed = if split {
            format!(
                "; {} batches in {} frames crossed the exchange",
                res.exchanged_batches, res.exchanged_frames
            )
        } else {
            String::new()
        };
        eprintln!(
            "run {r} ({} TaskManager{}): {:.0} events/s, {:.0} events/CPU-s{crossed}",
            if split { 2 } else { 1 },
            if split { "s" } else { "" },
            res.events_per_s,
            res.events_per_cpu_s
        );
    })?;
    print_report(a.json, &report, |r| r.markdown())
}

/// A bandwidth in bytes per second: `100MB` (10^6), `64MiB` (2^20), `1GB`,
/// `500KB`, or a plain number of bytes.
fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a bandwidth; give e.g. 100MB or 64MiB (per second)"))?;
    let unit = unit.trim().trim_end_matches("/s");
    let scale = match unit {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{s}'; use B, KB, MB, GB, KiB, MiB or GiB (per second)"
            ));
        }
    };
    let bytes = n * scale;
    if !(1.0..1e15).contains(&bytes) {
        return Err(format!(
            "'{s}' is out of range: between 1 B and 1 PB per second"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bandwidth;

    #[test]
    fn bandwidths_parse_with_units_and_say_what_is_wrong() {
        assert_eq!(parse_bandwidth("100MB"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("64MiB/s"), Ok(64 << 20));
        assert_eq!(parse_bandwidth("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        assert!(
            parse_bandwidth("fast")
                .unwrap_err()
                .contains("not a bandwidth")
        );
        assert!(
            parse_bandwidth("10Mb")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_bandwidth("0MB").unwrap_err().contains("out of range"));
    }
}
