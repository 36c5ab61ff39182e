//! One module per top-level command.

pub mod bench;
pub mod bench_failover;
pub mod bench_region;
pub mod bench_replication;
pub mod cluster;
pub mod drill;
pub mod job;
pub mod jobmanager;
pub mod local;
pub mod process;
pub mod region;
pub mod sandbox;
pub mod schema;
pub mod taskmanager;
pub mod validate;

/// Sets up `tracing` on stderr: `FERRY_LOG` (or `RUST_LOG`) picks levels,
/// default `info`; `json` gives one JSON object per line.
pub fn init_logging(format: &str, quiet_default: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet_default { "warn" } else { "info" };
    let filter = std::env::var("FERRY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .map(EnvFilter::new)
        .unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
