//! Trace export over OTLP. When `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, every `tracing` span at
//! info level or above from Ferry's crates — job submission, checkpoints,
//! leader changes, replication, failover — is also sent to that collector
//! over gRPC, batched. Without it nothing is exported and nothing extra
//! runs. An `https://` collector is dialed over TLS (rustls, as every
//! other link): its certificate must chain to the system's roots or to the
//! CA in `OTEL_EXPORTER_OTLP_CERTIFICATE` (or `..._TRACES_CERTIFICATE`).
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

/// The variables naming a CA file (PEM) to trust for an `https://`
/// collector besides the system's roots (the OpenTelemetry standard
/// names; the first set wins).
const CERTIFICATE_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
];

/// The variables saying a collector given without a scheme is plaintext.
const INSECURE_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
    "OTEL_EXPORTER_OTLP_INSECURE",
];

/// The variables bounding one export, in milliseconds (default 10 s).
const TIMEOUT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
];

/// Which spans are exported: Ferry's at info and above, dependencies' only
/// from warn (their own spans would otherwise include the exporter's).
const EXPORT_FILTER: &str = "warn,ferry=info,ferry_core=info,ferry_ha=info,ferry_jobmanager=info,ferry_region=info,ferry_taskmanager=info";

/// The tracer provider and the runtime its exporter runs on.
static EXPORT: OnceLock<(SdkTracerProvider, tokio::runtime::Runtime)> = OnceLock::new();

/// The first of `vars` that is set (and not blank), with its name.
fn first_set(vars: &[&'static str]) -> Option<(&'static str, String)> {
    vars.iter().find_map(|v| {
        std::env::var(v)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| (*v, s.trim().to_string()))
    })
}

/// The collector endpoint, when trace export is asked for.
pub fn endpoint() -> Option<String> {
    first_set(&ENDPOINT_VARS).map(|(_, e)| e)
}

/// `endpoint` with its scheme: one given without is `https://`, or
/// `http://` when the `..._INSECURE` variable says `true` (the
/// OpenTelemetry rule).
fn with_scheme(endpoint: &str, insecure: bool) -> String {
    let schemed = endpoint
        .split_once("://")
        .is_some_and(|(scheme, _)| !scheme.contains(['/', '?', '#']));
    match (schemed, insecure) {
        (true, _) => endpoint.to_string(),
        (false, true) => format!("http://{endpoint}"),
        (false, false) => format!("https://{endpoint}"),
    }
}

/// The export timeout of the `..._TIMEOUT` variables (milliseconds).
fn export_timeout() -> std::time::Duration {
    first_set(&TIMEOUT_VARS)
        .and_then(|(_, ms)| ms.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
        .unwrap_or(std::time::Duration::from_secs(10))
}

/// The gRPC channel to an `https://` collector: TLS from
/// `ferry_core::tls`, trusting the system's roots and the CA file of
/// `ca` (`(variable, path)`).
fn tls_channel(url: &str, ca: Option<(&str, &str)>) -> Result<tonic::transport::Channel, String> {
    let at = ca
        .map(|(var, _)| var)
        .unwrap_or("OTEL_EXPORTER_OTLP_CERTIFICATE");
    let config = ferry_core::tls::public_client_config(
        at,
        ca.map(|(_, path)| std::path::Path::new(path)),
        &[b"h2"],
    )
    .map_err(|e| e.to_string())?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("invalid endpoint: {e}"))?
        .timeout(export_timeout());
    Ok(
        endpoint.connect_with_connector_lazy(ferry_core::tls::Connector::fixed(
            std::sync::Arc::new(config),
        )),
    )
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
    let insecure = first_set(&INSECURE_VARS).is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"));
    let url = with_scheme(&endpoint, insecure);
    let ca = first_set(&CERTIFICATE_VARS);
    // Built inside the runtime: the gRPC channel's tasks live there.
    let exporter = rt.block_on(async {
        use opentelemetry_otlp::WithTonicConfig as _;
        let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if url.starts_with("https://") {
            let ca = ca.as_ref().map(|(var, path)| (*var, path.as_str()));
            let channel = tls_channel(&url, ca)?;
            builder.with_channel(channel).build().map_err(|e| e.to_string())
        } else {
            if let Some((var, _)) = &ca {
                eprintln!("warning: {var} is set but the OTLP collector {url} is not https://: the CA is not used");
            }
            builder.build().map_err(|e| e.to_string())
        }
    });
    let exporter = match exporter {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collector_without_a_scheme_is_https_unless_insecure() {
        assert_eq!(with_scheme("otel:4317", false), "https://otel:4317");
        assert_eq!(with_scheme("otel:4317", true), "http://otel:4317");
        assert_eq!(with_scheme("http://otel:4317", false), "http://otel:4317");
        assert_eq!(with_scheme("https://otel:4317", true), "https://otel:4317");
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("ca.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(async {
                tls_channel(
                    "https://otel:4317",
                    Some(("OTEL_EXPORTER_OTLP_CERTIFICATE", junk.to_str().unwrap())),
                )
            })
            .unwrap_err();
        assert!(
            e.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && e.contains("ca.pem"),
            "{e}"
        );
    }
}
