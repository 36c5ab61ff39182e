//! Fuzz targets, one per input Ferry takes from outside: job specs (YAML and
//! JSON), CEL expressions, REST requests, gRPC messages, checkpoint
//! manifests and state, NATS payloads, exchange messages between
//! TaskManagers and process config files.
//!
//! Each target feeds generated input to the real code and fails on a panic
//! or on an input that takes longer than [`HANG`]. Structured inputs are
//! made by editing valid documents with tokens that tend to break parsers
//! (brackets, anchors, huge numbers, deep nesting), so most inputs get past
//! the first syntax check.
//!
//! `cargo test -p ferry-fuzz` runs each for about a second (a smoke test
//! and the regression corpus under `tests/__fuzz__`); `scripts/fuzz.sh`
//! runs them for a set time. Every finding becomes a regression test next
//! to the code it broke.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bolero::check;
use bolero::generator::TypeGenerator;
use bytes::Bytes;
use ferry_core::schema::Schema;
use ferry_core::spec::parse_and_validate;
use ferry_core::value::{DataType, Value};
use ferry_taskmanager::batch::{Batch, Column};

/// Longest one input may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(2);

/// Runs `f` on `input`, failing if it takes longer than [`HANG`].
fn timed<T>(what: &str, input: &dyn Debug, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < HANG, "{what} took {took:?} (a hang) on {input:?}");
    out
}

/// Counts the inputs a target ran, printed when it ends.
struct Count(&'static str, AtomicU64);

impl Count {
    const fn new(name: &'static str) -> Self {
        Self(name, AtomicU64::new(0))
    }
    fn add(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        eprintln!(
            "fuzz target {}: {} inputs",
            self.0,
            self.1.load(Ordering::Relaxed)
        );
    }
}

/// One edit of a base document: at byte `at`, delete up to `delete % 8`
/// bytes and insert token `token`.
#[derive(Clone, Debug, TypeGenerator)]
struct Edit {
    at: u16,
    delete: u8,
    token: u8,
}

/// Pieces that break parsers and validators. No `/`: no edit can turn a
/// relative path into an absolute one.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\n",
    "  ",
    "- ",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "'",
    "\"",
    "#",
    "?",
    "|",
    ">",
    "\t",
    "\\u0000",
    "\u{1F680}",
    "~",
    "null",
    "true",
    "0",
    "-1",
    "99999999999999999999999",
    "-9223372036854775808",
    "9223372036854775807",
    "1e308",
    "-1e308",
    ".nan",
    ".inf",
    "0x10",
    "1ms",
    "0s",
    "100000000",
    "65537",
    "1000000h",
    "a: b\n",
    "key_by: k\n",
    "filter: \"n > 1\"\n",
    "map: {x: \"n * 2\"}\n",
    "window: {tumbling: 1ms}\n",
    "sliding: {size: 1h, slide: 1ms}",
    "[1,2,3].map(x, [x, x])",
    ".exists(x, x > 1)",
    "size(",
    "int(",
    "'a' + ",
    " && ",
    " || !",
    "<<: *a\n",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "{a: [{b: [",
];

/// `base` with `edits` applied (at most 16).
fn mutate(base: &str, edits: &[Edit]) -> String {
    let mut s = base.as_bytes().to_vec();
    for e in edits.iter().take(16) {
        let at = e.at as usize % (s.len() + 1);
        let delete = (e.delete as usize % 8).min(s.len() - at);
        s.drain(at..at + delete);
        let t = TOKENS[e.token as usize % TOKENS.len()];
        s.splice(at..at, t.bytes());
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// Valid specs covering every source, operator and sink.
const SPECS: &[&str] = &[
    r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {name: fz, labels: {team: a}}
spec:
  parallelism: 2
  checkpointing: {interval: 1s, retained: 2, timeout: 10s, tolerableFailures: 3}
  restartStrategy: {type: exponential-delay, initialDelay: 100ms, maxDelay: 1s, multiplier: 2, jitter: 0.1}
  source:
    generator:
      total: 100
      rate: 1000
      partitions: 4
      eventTime: {start: "2026-01-01T00:00:00Z", step: 10ms, maxOutOfOrderness: 1s, late: {fraction: 0.1, by: 5s}}
      fields:
        user: {type: key, cardinality: 10, prefix: "u-"}
        n: {type: int, min: -5, max: 5}
        x: {type: float, min: 0, max: 1}
        c: {type: choice, values: [a, b]}
        s: {type: sequence}
  operators:
    - filter: "n > 0 && user.startsWith('u')"
    - map: {user: user, n: "n * 2", y: "x + 1.0", k: "[1, 2].exists(v, v == n)"}
    - key_by: user
    - window:
        sliding: {size: 1m, slide: 10s}
        allowedLateness: 5s
        aggregate: {clicks: count, total: sum(n), low: min(y), high: max(y), mean: avg(y)}
  sink:
    blackhole: {}
"#,
    r#"{"apiVersion": "ferry.dev/v1", "kind": "Job", "metadata": {"name": "fz-json"},
 "spec": {"source": {"file": {"path": "in/*.csv", "format": "csv", "header": true,
   "schema": {"user": "string", "ts": "timestamp", "amount": "float"},
   "eventTime": {"field": "ts", "maxOutOfOrderness": "1s"}, "onBadLine": "skip"}},
  "operators": [{"key_by": ["user"]}, {"window": {"tumbling": "1m", "aggregate": {"n": "count"}}}],
  "sink": {"file": {"path": "out"}}}}
"#,
    r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {name: fz-nats}
spec:
  source:
    nats:
      url: nats://127.0.0.1:4222
      stream: IN
      subjects: [in.a, in.b]
      schema: {user: string, ts: timestamp, amount: float}
      eventTime: {field: ts, maxOutOfOrderness: 5s}
      startFrom: {sequence: 5}
      onBadLine: skip
      idleTimeout: 10s
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {n: count, s: sum(amount)}}
  sink:
    nats: {url: "nats://127.0.0.1:4222", subject: out.x, stream: OUT}
"#,
];

#[test]
fn spec_documents() {
    let count = Count::new("spec_documents");
    check!()
        .with_type::<(u8, Vec<Edit>)>()
        .for_each(|(base, edits)| {
            let text = mutate(SPECS[*base as usize % SPECS.len()], edits);
            count.add();
            timed("parsing a spec", &text, || {
                if let Ok(spec) = parse_and_validate(&text) {
                    // A spec that passes validation must also plan.
                    ferry_taskmanager::runtime::JobPlan::new(&spec)
                        .unwrap_or_else(|e| panic!("valid spec does not plan ({e}):\n{text}"));
                }
            });
        });
}

#[test]
fn spec_bytes() {
    let count = Count::new("spec_bytes");
    check!().for_each(|bytes: &[u8]| {
        count.add();
        let text = String::from_utf8_lossy(bytes);
        timed("parsing bytes as a spec", &text, || {
            let _ = parse_and_validate(&text);
        });
    });
}

/// An expression built by a small stack machine over fragments, so that
/// most inputs parse: each op pushes a leaf or combines the top of the
/// stack.
fn expression(ops: &[(u8, u8)]) -> String {
    const LEAVES: &[&str] = &[
        "n",
        "x",
        "user",
        "flag",
        "1",
        "-3",
        "2.5",
        "'a'",
        "''",
        "true",
        "null",
        "[1, 2, 3]",
        "[n, n]",
        "{'k': n}",
        "9223372036854775807",
        "1e308",
        "[]",
        "ghost",
    ];
    const BINARY: &[&str] = &[
        "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "in",
    ];
    const UNARY: &[&str] = &[
        "!{}",
        "-{}",
        "({})",
        "size({})",
        "int({})",
        "double({})",
        "string({})",
        "[{}]",
        "{}.size()",
        "{}.startsWith('a')",
        "{}.contains('b')",
        "{}[0]",
        "has({}.k)",
        "{}.map(v, [v, v])",
        "{}.filter(v, v > 1)",
        "{}.exists(v, v == n)",
        "{}.all(v, v < 9)",
        "{}.exists_one(v, true)",
        "system({})",
        "{}.matches('a')",
        "timestamp({})",
        "duration({})",
        "{}.getHours()",
    ];
    let mut stack: Vec<String> = Vec::new();
    for (op, arg) in ops.iter().take(64) {
        match op % 4 {
            0 | 1 => stack.push(LEAVES[*arg as usize % LEAVES.len()].to_string()),
            2 => {
                if let Some(e) = stack.pop() {
                    stack.push(UNARY[*arg as usize % UNARY.len()].replace("{}", &e));
                }
            }
            _ => {
                if stack.len() >= 2 {
                    let b = stack.pop().unwrap();
                    let a = stack.pop().unwrap();
                    let op = BINARY[*arg as usize % BINARY.len()];
                    stack.push(format!("{a} {op} {b}"));
                }
            }
        }
    }
    stack.pop().unwrap_or_else(|| "n".into())
}

#[test]
fn cel_expressions() {
    let count = Count::new("cel_expressions");
    let schema = Schema::new([
        ("n".to_string(), DataType::Int),
        ("x".to_string(), DataType::Float),
        ("user".to_string(), DataType::String),
        ("flag".to_string(), DataType::Bool),
    ]);
    let rows = 64;
    let batch = Batch {
        schema: Arc::new(schema.clone()),
        columns: vec![
            Column::Int((0..rows).map(|i| i * 7 - 100).collect()),
            Column::Float((0..rows).map(|i| i as f64 / 3.0).collect()),
            Column::Str((0..rows).map(|i| format!("u{i}").into()).collect()),
            Column::Bool((0..rows).map(|i| i % 2 == 0).collect()),
        ],
        ts: (0..rows).collect(),
    };
    check!().with_type::<Vec<(u8, u8)>>().for_each(|ops| {
        let src = expression(ops);
        count.add();
        let checked = timed("checking an expression", &src, || {
            ferry_core::spec::expr::check_expr(&src, &schema)
        });
        if checked.is_err() {
            return;
        }
        // What validation accepts must compile and evaluate within its
        // bound, on every row.
        let mut e = ferry_taskmanager::expr::CompiledExpr::compile(&src, &schema)
            .unwrap_or_else(|e| panic!("valid expression does not compile ({e}): {src}"));
        let r = timed("evaluating 64 rows", &src, || e.eval(&batch));
        assert_eq!(r.column.len(), rows as usize, "{src}");
    });
}

/// The runtime (and a JobManager on it) the REST target sends requests to.
fn rest_app() -> &'static (tokio::runtime::Runtime, axum::Router, tempfile::TempDir) {
    static APP: OnceLock<(tokio::runtime::Runtime, axum::Router, tempfile::TempDir)> =
        OnceLock::new();
    APP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data_url = dir.path().display().to_string();
        let router = rt.block_on(async {
            // Fuzzed specs may touch only the temp dir.
            let access = ferry_core::access::AccessPolicy::new(
                std::slice::from_ref(&data_url),
                &Default::default(),
                "the fuzz target's temp dir",
            )
            .unwrap();
            let jm = ferry_jobmanager::JobManager::new(ferry_jobmanager::JobManagerConfig {
                data_url,
                instance_id: "fuzz".into(),
                access,
            });
            ferry_jobmanager::api::router(jm)
        });
        (rt, router, dir)
    })
}

/// A REST request: method, route, a path segment, a query and a body.
#[derive(Clone, Debug, TypeGenerator)]
struct RestInput {
    method: u8,
    route: u8,
    segment: Vec<u8>,
    query: Vec<u8>,
    body_base: u8,
    edits: Vec<Edit>,
    raw_body: bool,
}

#[test]
fn rest_requests() {
    const ROUTES: &[&str] = &[
        "/v1/jobs",
        "/v1/jobs/{}",
        "/v1/jobs/{}/savepoints",
        "/v1/jobs/{}/checkpoints",
        "/v1/cluster",
        "/v1/regions",
        "/v1/regions/{}/failover",
        "/v1/regions/{}/failback",
        "/v1/drills",
        "/v1/drills/{}",
        "/v1/drills/outage",
        "/health/ha",
        "/health/regions",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/{}",
    ];
    const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"];
    // Bodies: specs of short bounded jobs (so started jobs end at once).
    let bounded: Vec<String> = SPECS
        .iter()
        .map(|s| s.replace("total: 100", "total: 10"))
        .collect();
    let (rt, router, _) = rest_app();
    // A panic inside is the finding itself; nothing is reused after one.
    let app = std::panic::AssertUnwindSafe((rt, router));
    let count = Count::new("rest_requests");
    check!().with_type::<RestInput>().for_each(|input| {
        let (rt, router) = *app;
        count.add();
        let segment: String = String::from_utf8_lossy(&input.segment)
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.%".contains(*c))
            .take(40)
            .collect();
        let query: String = String::from_utf8_lossy(&input.query)
            .chars()
            .filter(|c| c.is_ascii_graphic() && !"#/".contains(*c))
            .take(80)
            .collect();
        let route = ROUTES[input.route as usize % ROUTES.len()].replace("{}", &segment);
        let uri = if query.is_empty() {
            route
        } else {
            format!("{route}?{query}")
        };
        let body = if input.raw_body {
            input.edits.iter().map(|e| e.token).collect::<Vec<u8>>()
        } else {
            mutate(
                &bounded[input.body_base as usize % bounded.len()],
                &input.edits,
            )
            .into_bytes()
        };
        let req_method = METHODS[input.method as usize % METHODS.len()];
        let Ok(req) = axum::http::Request::builder()
            .method(req_method)
            .uri(&uri)
            .header("content-type", "application/yaml")
            .body(axum::body::Body::from(body))
        else {
            return; // not a request a client could send
        };
        let (status, body) = timed("a REST request", &input, || {
            rt.block_on(async {
                use tower::ServiceExt;
                let resp = tokio::time::timeout(HANG, router.clone().oneshot(req))
                    .await
                    .unwrap_or_else(|_| panic!("no answer to {uri} within {HANG:?}"))
                    .unwrap();
                let status = resp.status();
                let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
                    .await
                    .unwrap();
                (status, body)
            })
        });
        // (A HEAD answer has no body by definition.)
        if (status.is_client_error() || status.is_server_error()) && req_method != "HEAD" {
            // Every error is JSON a person can act on.
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!(
                    "{status} for {uri} is not JSON ({e}): {}",
                    String::from_utf8_lossy(&body)
                )
            });
            assert!(v["error"]["message"].is_string(), "{status} for {uri}: {v}");
            // A handler that panicked (caught as a 500) is a finding.
            assert_ne!(
                v["error"]["code"], "internal_error",
                "{status} for {uri}: {v}"
            );
        }
    });
}

#[test]
fn grpc_messages() {
    use ferry_core::proto;
    use prost::Message;
    let count = Count::new("grpc_messages");
    check!().for_each(|bytes: &[u8]| {
        count.add();
        timed("decoding gRPC messages", &bytes, || {
            if let Ok(ev) = proto::DeploymentEvent::decode(bytes)
                && let Some(e) = ev.event
            {
                let _ = ferry_taskmanager::wire::event_from_proto(e);
            }
            if let Ok(ack) = proto::TaskAck::decode(bytes) {
                let _ = ferry_taskmanager::wire::ack_from_proto(ack);
            }
            if let Ok(req) = proto::DeployRequest::decode(bytes)
                && let Ok(spec) = parse_and_validate(&req.spec)
            {
                let _ = ferry_taskmanager::runtime::JobPlan::new(&spec);
            }
            let _ = proto::TriggerRequest::decode(bytes);
            let _ = proto::CompleteRequest::decode(bytes);
            let _ = proto::FenceRequest::decode(bytes);
            let _ = proto::TmEvent::decode(bytes);
            let _ = proto::AttachRequest::decode(bytes);
            if bytes.len() >= 4 {
                let k = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let _ = ferry_taskmanager::wire::kind_from_proto(k);
            }
        });
    });
}

/// Checkpoint state as a restore reads it: a manifest (edited JSON) and
/// state files (arbitrary bytes) for every stateful part of a job.
#[derive(Clone, Debug, TypeGenerator)]
struct StateInput {
    plan: u8,
    source: Vec<u8>,
    window: Vec<u8>,
    /// A delta on `window` (incremental checkpoints), when not empty.
    window_delta: Vec<u8>,
    sink: Vec<u8>,
    manifest_edits: Vec<Edit>,
}

#[test]
fn checkpoint_state() {
    let plans: Vec<ferry_taskmanager::runtime::JobPlan> = SPECS
        .iter()
        .map(|s| {
            let mut spec = parse_and_validate(s).unwrap();
            spec.spec.parallelism = 1;
            ferry_taskmanager::runtime::JobPlan::new(&spec).unwrap()
        })
        .collect();
    let template = serde_json::json!({
        "format": 1, "job_id": "0000000000000000000000000000abcd", "job_name": "fz",
        "checkpoint_id": 3, "kind": "checkpoint", "created_at": "2026-01-01T00:00:00Z",
        "jm_epoch": 1, "region_epoch": 0, "parallelism": 1, "watermark": 0,
        "records_in": 1, "records_out": 1, "finished": false, "duration_ms": 1,
        "files": [], "source_offsets": {}, "sink_transactions": [], "restored_from": null
    })
    .to_string();
    let count = Count::new("checkpoint_state");
    check!().with_type::<StateInput>().for_each(|input| {
        count.add();
        let text = mutate(&template, &input.manifest_edits);
        let manifest: Option<ferry_core::manifest::Manifest> =
            timed("decoding a manifest", &text, || {
                serde_json::from_str(&text).ok()
            });
        let Some(mut manifest) = manifest.or_else(|| serde_json::from_str(&template).ok()) else {
            panic!("the template manifest does not decode");
        };
        let mut files = BTreeMap::new();
        for (op, data) in [
            ("source", &input.source),
            ("window", &input.window),
            ("sink", &input.sink),
        ] {
            let path = ferry_core::manifest::state_file(op, 0);
            manifest.files.push(ferry_core::manifest::FileEntry {
                path: path.clone(),
                size: data.len() as u64,
                sha256: ferry_core::storage::sha256_hex(data),
                operator: op.into(),
                subtask: 0,
                shared: false,
                chain: 0,
            });
            files.insert(path, Bytes::from(data.clone()));
        }
        if !input.window_delta.is_empty() {
            let data = &input.window_delta;
            let sha256 = ferry_core::storage::sha256_hex(data);
            let path = ferry_core::manifest::shared_file("window", 0, &sha256);
            manifest.files.push(ferry_core::manifest::FileEntry {
                path: path.clone(),
                size: data.len() as u64,
                sha256,
                operator: "window".into(),
                subtask: 0,
                shared: true,
                chain: 1,
            });
            files.insert(path, Bytes::from(data.clone()));
        }
        let cp = ferry_core::manifest::VerifiedCheckpoint { manifest, files };
        let plan = &plans[input.plan as usize % plans.len()];
        timed("decoding checkpoint state", &input, || {
            let _ = ferry_taskmanager::runtime::check_restore(plan, &cp);
        });
    });
}

#[test]
fn nats_payloads() {
    let schema = Schema::new([
        ("user".to_string(), DataType::String),
        ("ts".to_string(), DataType::Timestamp),
        ("amount".to_string(), DataType::Float),
        ("n".to_string(), DataType::Int),
        ("ok".to_string(), DataType::Bool),
        ("any".to_string(), DataType::Any),
    ]);
    let base = r#"{"user": "u1", "ts": "2026-01-01T00:00:00Z", "amount": 1.5, "n": 3, "ok": true, "any": [1, {"a": null}]}"#;
    let count = Count::new("nats_payloads");
    check!()
        .with_type::<(bool, Vec<Edit>, Vec<u8>)>()
        .for_each(|(raw, edits, bytes)| {
            count.add();
            let payload = if *raw {
                bytes.clone()
            } else {
                mutate(base, edits).into_bytes()
            };
            let out = timed("decoding a NATS payload", &payload, || {
                ferry_taskmanager::source::nats::decode_payload("IN", &schema, &payload, 7)
            });
            if let Ok(values) = out {
                assert_eq!(values.len(), schema.fields.len());
                // Strict typing: a value is null or of its field's type.
                for (v, f) in values.iter().zip(&schema.fields) {
                    let fits = matches!(
                        (v, f.data_type),
                        (Value::Null, _)
                            | (_, DataType::Any)
                            | (Value::Str(_), DataType::String)
                            | (Value::Ts(_), DataType::Timestamp)
                            | (Value::Float(_), DataType::Float)
                            | (Value::Int(_), DataType::Int)
                            | (Value::Bool(_), DataType::Bool)
                    );
                    assert!(fits, "{v:?} in {} ({})", f.name, f.data_type);
                }
            }
        });
}

/// Exchange messages (Arrow IPC) from a peer TaskManager: a valid
/// message with bytes overwritten, or raw bytes. Decoding fails or yields
/// a batch of the plan's fields; it never panics or hangs.
#[test]
fn exchange_messages() {
    use ferry_taskmanager::exchange::{BatchDecoder, BatchEncoder, Message};
    let schema = Arc::new(Schema::new([
        ("user".to_string(), DataType::String),
        ("n".to_string(), DataType::Int),
        ("any".to_string(), DataType::Any),
    ]));
    let batch = Batch {
        schema: schema.clone(),
        columns: vec![
            Column::Str(vec![Arc::from("u1"), Arc::from("u2"), Arc::from("é")]),
            Column::Int(vec![1, -2, i64::MAX]),
            Column::from_values(vec![
                Value::Null,
                Value::Float(1.5),
                Value::Str(Arc::from("x")),
            ]),
        ],
        ts: vec![1, 2, 3],
    };
    let valid = BatchEncoder::new().encode(batch.clone()).unwrap();
    let count = Count::new("exchange_messages");
    check!()
        .with_type::<(bool, Vec<(u16, u8)>, Vec<u8>)>()
        .for_each(|(raw, edits, bytes)| {
            count.add();
            let msg = Message {
                new_stream: true,
                bytes: if *raw {
                    bytes.clone().into()
                } else {
                    let mut b = valid.bytes.to_vec();
                    for (at, v) in edits {
                        let i = *at as usize % b.len();
                        b[i] = *v;
                    }
                    b.into()
                },
            };
            let mut dec = BatchDecoder::new(schema.clone(), 1 << 20);
            let out = timed("decoding an exchange message", &msg.bytes, || {
                dec.decode(&msg)
            });
            if let Ok(b) = out {
                assert_eq!(b.columns.len(), 3);
                assert!(b.columns.iter().all(|c| c.len() == b.ts.len()));
            }
        });
}

#[test]
fn config_files() {
    let base = r#"region: eu-west
instanceId: jm-1
nats: {urls: ["nats://127.0.0.1:4222"], bucket: ferry, replicas: 1}
storage: file:///var/lib/ferry
api: {listen: "127.0.0.1:8081"}
ha: {heartbeatInterval: 1s, memberExpiry: 5s, leaseTtl: 5s, renewInterval: 1s, renewDeadline: 3s}
taskmanager: {slots: 4}
regions:
  stores: {eu-west: "file:///var/lib/ferry", us-east: "file:///var/lib/ferry-us"}
  primary: eu-west
"#;
    const VARS: &[&str] = &[
        "FERRY_REGION",
        "FERRY_NATS_URLS",
        "FERRY_NATS_REPLICAS",
        "FERRY_HA_LEASE_TTL",
        "FERRY_HA_RENEW_DEADLINE",
        "FERRY_TASKMANAGER_SLOTS",
        "FERRY_HA_MIN_INSTANCES_FOR_ELECTION",
        "FERRY_STORAGE",
    ];
    let count = Count::new("config_files");
    check!()
        .with_type::<(Vec<Edit>, Vec<(u8, Vec<Edit>)>)>()
        .for_each(|(edits, env)| {
            count.add();
            let text = mutate(base, edits);
            let env: BTreeMap<String, String> = env
                .iter()
                .take(4)
                .map(|(v, e)| (VARS[*v as usize % VARS.len()].to_string(), mutate("5", e)))
                .collect();
            timed("loading a config", &text, || {
                let _ = ferry_core::config::ProcessConfig::load(Some(("ferry.yaml", &text)), &env);
            });
        });
}
