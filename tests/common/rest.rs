//! REST calls of tests that look at refusals: status, headers and JSON
//! body of any answer, and an assertion on an error answer.

use serde_json::Value;

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
