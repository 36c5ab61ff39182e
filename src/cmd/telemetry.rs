//! Trace export over OTLP. When `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, every `tracing` span at
//! info level or above from Ferry's crates — job submission, checkpoints,
//! leader changes, replication, failover — is also sent to that collector
//! over gRPC, batched. Without it nothing is exported and nothing extra
//! runs.
//!
//! Invariant: the exporter has its own small Tokio runtime (its gRPC
//! connection lives there, independent of the process's runtimes), and
//! [`shutdown`] flushes the spans still queued before the process exits.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::registry::LookupSpan;

/// The variables that turn export on (the OpenTelemetry standard names).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Which spans are exported: Ferry's at info and above, dependencies' only
/// from warn (their own spans would otherwise include the exporter's).
const EXPORT_FILTER: &str = "warn,ferry=info,ferry_core=info,ferry_ha=info,ferry_jobmanager=info,ferry_region=info,ferry_taskmanager=info";

/// The tracer provider and the runtime its exporter runs on.
static EXPORT: OnceLock<(SdkTracerProvider, tokio::runtime::Runtime)> = OnceLock::new();

/// The collector endpoint, when trace export is asked for.
pub fn endpoint() -> Option<String> {
    ENDPOINT_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// A `tracing` layer exporting spans to the OTLP collector, or `None` when
/// no endpoint is set (or the exporter cannot be built, which is logged to
/// stderr: a bad tracing setup must not stop the process). `service` is the
/// default `service.name`; `OTEL_SERVICE_NAME` overrides it.
pub fn layer<S>(service: &str) -> Option<impl Layer<S>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let endpoint = endpoint()?;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferry-otlp")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warning: trace export to {endpoint} disabled: no runtime for it ({e})");
            return None;
        }
    };
    // Built inside the runtime: the gRPC channel's tasks live there.
    let exporter = match rt.block_on(async {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    }) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: trace export to {endpoint} disabled: {e}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| service.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    let tracer = provider.tracer("ferry");
    if EXPORT.set((provider, rt)).is_err() {
        // Set up once per process; a second call exports nothing more.
        return None;
    }
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(EnvFilter::new(EXPORT_FILTER)),
    )
}

/// Exports the spans still queued and stops the exporter (bounded by the
/// exporter's own timeout). Call once, when the command is done.
pub fn shutdown() {
    if let Some((provider, _rt)) = EXPORT.get()
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: flushing traces at exit failed: {e}");
    }
}
