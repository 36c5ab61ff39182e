//! REST calls of tests that look at refusals: status, headers and JSON
//! body of any answer, and an assertion on an error answer.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// Mutating calls [`call`] made that got past authentication (any status
/// but 401): each must be in the audit trail. One count per test binary.
static MUTATING: AtomicUsize = AtomicUsize::new(0);

/// How many mutating calls got past authentication so far.
pub fn mutating_calls() -> usize {
    MUTATING.load(Ordering::SeqCst)
}

/// `method path` on `url` with `token` (if any) and extra headers; status,
/// headers and JSON body.
pub async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mutating = !matches!(method, reqwest::Method::GET | reqwest::Method::HEAD);
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    if mutating && status != 401 {
        MUTATING.fetch_add(1, Ordering::SeqCst);
    }
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, v)
}

/// Asserts an error answer: `status`, `code`, and a message containing
/// each of `says`.
#[track_caller]
pub fn refused(
    got: &(u16, reqwest::header::HeaderMap, Value),
    status: u16,
    code: &str,
    says: &[&str],
) {
    let (s, _, v) = got;
    assert_eq!(*s, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    for w in says {
        assert!(msg.contains(w), "{msg:?} does not say {w:?}");
    }
}
