//! Trace export over OTLP: `ferry local` with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at an OTLP/gRPC trace receiver run by this test (a tonic server
//! implementing opentelemetry-proto's TraceService on a loopback port)
//! sends the spans of its checkpoints — the `checkpoint` span from trigger
//! to manifest, with its `checkpoint.complete` child — and of the job's
//! submission; to an `https://` receiver whose certificate a test CA
//! signed, too, given that CA in `OTEL_EXPORTER_OTLP_CERTIFICATE`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Workdir;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;

/// Upper bound on waiting for the spans to arrive.
const SPANS_WITHIN: Duration = Duration::from_secs(60);

const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: traced}
spec:
  parallelism: 1
  checkpointing: {interval: 200ms}
  source:
    generator:
      partitions: 1
      rate: 5000
      eventTime: {step: 10ms}
      fields:
        user: {type: key, cardinality: 5, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1s, aggregate: {clicks: count}}
  sink:
    blackhole: {}
"#;

/// The in-test collector: every exported span, with its service name.
struct Receiver(mpsc::UnboundedSender<(String, Span)>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let _ = self.0.send((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A span attribute rendered as text.
fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

/// Runs `ferry local` exporting to `endpoint` (with `env` besides) until
/// a completed `checkpoint` span and its `checkpoint.complete` child have
/// arrived on `rx`; every span received by id, and that pair.
async fn spans_of_a_checkpoint(
    endpoint: &str,
    env: &[(&str, &str)],
    rx: &mut mpsc::UnboundedReceiver<(String, Span)>,
) -> (HashMap<Vec<u8>, (String, Span)>, Span, Span) {
    let w = Workdir::new(SPEC);
    let mut all_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        // Export batches every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    all_env.extend_from_slice(env);
    let mut ferry = w.spawn_local_env(&[], "ferry.log", &all_env);

    // Spans by id; done once a completed checkpoint span and its
    // `checkpoint.complete` child have both arrived.
    let mut spans: HashMap<Vec<u8>, (String, Span)> = HashMap::new();
    let start = Instant::now();
    let (checkpoint, child) = loop {
        let found = spans.values().find_map(|(_, s)| {
            (s.name == "checkpoint" && attr(s, "outcome").as_deref() == Some("completed"))
                .then_some(s)
                .and_then(|cp| {
                    spans
                        .values()
                        .find(|(_, c)| {
                            c.name == "checkpoint.complete" && c.parent_span_id == cp.span_id
                        })
                        .map(|(_, c)| (cp.clone(), c.clone()))
                })
        });
        if let Some(f) = found {
            break f;
        }
        let left = SPANS_WITHIN.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((service, span))) => {
                spans.insert(span.span_id.clone(), (service, span));
            }
            _ => {
                let _ = ferry.kill();
                let _ = ferry.wait();
                let names: Vec<&str> = spans.values().map(|(_, s)| s.name.as_str()).collect();
                panic!(
                    "no completed checkpoint span with its checkpoint.complete child within {SPANS_WITHIN:?}; spans received: {names:?}; ferry log:\n{}",
                    w.log("ferry.log")
                );
            }
        }
    };
    let _ = ferry.kill();
    let _ = ferry.wait();
    (spans, checkpoint, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_spans_reach_an_otlp_collector() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(tx)))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                ),
        )
    };
    let (spans, checkpoint, child) = spans_of_a_checkpoint(&endpoint, &[], &mut rx).await;
    stop.cancel();
    let _ = server.await;

    // The span says which job and checkpoint it is, and lasts from trigger
    // to manifest; its child is inside it.
    let job = attr(&checkpoint, "job").expect("job attribute");
    assert_eq!(job.len(), 32, "job id {job}");
    let n: u64 = attr(&checkpoint, "checkpoint")
        .expect("checkpoint attribute")
        .parse()
        .unwrap();
    assert!(n >= 1);
    assert_eq!(attr(&child, "checkpoint"), Some(n.to_string()));
    assert_eq!(child.trace_id, checkpoint.trace_id);
    assert!(checkpoint.start_time_unix_nano <= child.start_time_unix_nano);
    assert!(child.end_time_unix_nano <= checkpoint.end_time_unix_nano);
    assert!(attr(&child, "size_bytes").is_some_and(|s| s.parse::<u64>().unwrap() > 0));
    let (service, _) = &spans[&checkpoint.span_id];
    assert_eq!(service, "ferry-local");
    // The submission was traced too.
    assert!(
        spans.values().any(|(_, s)| s.name == "job.submit"),
        "no job.submit span"
    );
}

/// The same collector over TLS only (a test CA's certificate, ALPN h2):
/// the spans arrive over `https://` with the CA given in the standard
/// variable, and every connection that reached the service completed a
/// TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_spans_reach_an_https_collector_trusting_its_ca() {
    use ferry_core::tls::{ClientAuth, ServerTls, TlsFiles};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let pki = ferry_testkit::pki::Pki::new(dir.path(), "otel");
    let leaf = pki.issue("collector", &["127.0.0.1"]);
    let tls = ServerTls::load(
        TlsFiles::new("otlp-test", &leaf.cert, &leaf.key, &leaf.ca),
        ClientAuth::None,
        &[b"h2"],
        Duration::from_secs(3600),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let refused = Arc::new(AtomicU64::new(0));
    let incoming = {
        let refused = refused.clone();
        ferry_core::tls::incoming(
            listener,
            tls,
            Arc::new(move || {
                refused.fetch_add(1, Ordering::SeqCst);
            }),
        )
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(tx)))
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        )
    };
    let ca = pki.ca_file().display().to_string();
    let (spans, checkpoint, _) = spans_of_a_checkpoint(
        &endpoint,
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str())],
        &mut rx,
    )
    .await;
    stop.cancel();
    let _ = server.await;
    assert_eq!(spans[&checkpoint.span_id].0, "ferry-local");
    assert!(attr(&checkpoint, "job").is_some_and(|j| j.len() == 32));
    assert!(
        spans.values().any(|(_, s)| s.name == "job.submit"),
        "no job.submit span"
    );
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "a handshake with the collector failed"
    );
}
