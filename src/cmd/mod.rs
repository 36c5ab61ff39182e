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
pub mod openapi;
pub mod process;
pub mod region;
pub mod sandbox;
pub mod schema;
pub mod taskmanager;
pub mod telemetry;
pub mod validate;

/// Sets up `tracing` on stderr: `FERRY_LOG` (or `RUST_LOG`) picks levels,
/// default `info`; `json` gives one JSON object per line. With
/// `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans also go to that OTLP collector
/// as service `service` ([`telemetry`]).
pub fn init_logging(format: &str, quiet_default: bool, service: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let default = if quiet_default { "warn" } else { "info" };
    let filter = std::env::var("FERRY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .map(EnvFilter::new)
        .unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(telemetry::layer(service))
        .try_init();
}
