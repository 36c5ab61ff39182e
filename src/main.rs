//! The `ferry` binary: parses the command line and dispatches to the crates.
//! Nothing else lives here.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ferry: stream processing that keeps running through the loss of a process,
/// a machine or a region.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a job in this process (JobManager + TaskManager, no servers needed).
    Local(cmd::local::LocalArgs),
    /// Check a job spec and report every problem with field path and line.
    Validate(cmd::validate::ValidateArgs),
    /// Print the JSON Schema of job specs (for editors).
    Schema(cmd::schema::SchemaArgs),
    /// Manage jobs on a running JobManager over its REST API.
    #[command(subcommand)]
    Job(cmd::job::JobCommand),
    /// Run one JobManager of a region (leader election over NATS).
    Jobmanager(cmd::process::ProcessArgs),
    /// Run one TaskManager of a region (task slots; runs what the leader deploys).
    Taskmanager(cmd::taskmanager::TaskmanagerArgs),
    /// Named JobManager targets (URL, CA, token) in a contexts file: list,
    /// use, set, delete, show.
    Context(cmd::context::ContextArgs),
    /// Inspect the region's JobManagers: leader, epoch, members.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCommand),
    /// The audit trail: who changed what (submit, cancel, failover, drills),
    /// newest first.
    Audit(cmd::audit::AuditArgs),
    /// Cross-region operations: region health and replication lag (status),
    /// moving the jobs to another region (failover, failback), copying and
    /// test-restoring checkpoints between regions' stores (replicate, verify).
    #[command(subcommand)]
    Region(cmd::region::RegionCommand),
    /// Failover drills: fail over on purpose, measure RTO and RPO, pass or
    /// fail against targets.
    #[command(subcommand)]
    Drill(cmd::drill::DrillCommand),
    /// Start a whole multi-region Ferry on loopback (NATS per region, a
    /// global NATS cluster, stores, JobManagers, TaskManagers) for demos
    /// and drills.
    Sandbox(cmd::sandbox::SandboxArgs),
    /// Print the OpenAPI document of the REST API (served at /openapi.json).
    Openapi(cmd::openapi::OpenapiArgs),
    /// Benchmarks: throughput, JobManager failover, region failover,
    /// replication lag (see docs/benchmarks.md).
    Bench(cmd::bench::BenchArgs),
    /// A seeded campaign of random faults (processes, NATS, links, the
    /// object store, whole regions) against a two-region Ferry on loopback,
    /// each round audited end to end (see docs/reliability.md).
    Chaos(cmd::chaos::ChaosArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local(args) => cmd::local::run(args),
        Command::Validate(args) => cmd::validate::run(args),
        Command::Schema(args) => cmd::schema::run(args),
        Command::Job(c) => cmd::job::run(c),
        Command::Jobmanager(args) => cmd::jobmanager::run(args),
        Command::Taskmanager(args) => cmd::taskmanager::run(args),
        Command::Context(a) => cmd::context::run(a),
        Command::Cluster(c) => cmd::cluster::run(c),
        Command::Audit(a) => cmd::audit::run(a),
        Command::Region(c) => cmd::region::run(c),
        Command::Drill(c) => cmd::drill::run(c),
        Command::Sandbox(args) => cmd::sandbox::run(args),
        Command::Openapi(args) => cmd::openapi::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Chaos(args) => cmd::chaos::run(args),
    };
    // Spans still queued for the OTLP collector go out before exit.
    cmd::telemetry::shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
