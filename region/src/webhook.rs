//! The region webhook (`regions.webhook`): what a region announces when it
//! takes or loses the primary role ([`Announcement`], naming who caused the
//! move), and its delivery as a JSON `POST` over `http://` or `https://`
//! ([`Webhook`]): the system's roots plus an optional private CA
//! (`regions.webhookCaFile`), an optional bearer token
//! (`regions.webhookTokenFile`), 5 s per attempt, never retried.
//!
//! Invariant: nothing logged names more of the URL than its scheme, host
//! and port (a webhook's path or query often is its secret), nor the token;
//! a delivery that fails says whether TLS trust, the connection, the time
//! or the HTTP status failed it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_core::RegionEpoch;
use serde::Serialize;

/// The actor of a move nobody asked for: a standby took over a silent
/// primary by itself, or the home region created the first lease.
pub const AUTOMATIC: &str = "automatic";

/// Bound on one delivery.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What a region announces when its role changes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Announcement {
    /// `promoted` (this region took the region lease) or `demoted` (it
    /// lost it).
    pub event: &'static str,
    /// The region announcing.
    pub region: String,
    /// The primary region now.
    pub primary: String,
    /// The region epoch of that primary.
    pub epoch: RegionEpoch,
    /// Who moved the lease to `primary`: the authenticated REST caller of
    /// the switchover, forced failover, fail-back or drill (`anonymous`
    /// when `api.auth` is off), or [`AUTOMATIC`]; `unknown` for a lease
    /// written by a Ferry that did not record it.
    pub actor: String,
    /// Why, as the lease records it (`switchover from east`, `failover:
    /// primary east silent for more than 5s`, `initial`, ...).
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// Where a coordinator's announcements go.
pub trait Announce: Send + Sync + fmt::Debug {
    /// Delivers `a` in the background; never blocks the caller.
    fn announce(&self, a: Announcement);
}

/// An HTTP(S) endpoint receiving announcements as JSON `POST`s.
#[derive(Clone)]
pub struct Webhook {
    url: String,
    /// The URL as logged: scheme, host and port only.
    shown: String,
    client: reqwest::Client,
    token: Option<Arc<str>>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.shown)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Webhook {
    /// The webhook at `url`, trusting the CA certificates in `ca_file`
    /// besides the system's roots and sending the token on the first line
    /// of `token_file`. Errors name the config key and the file.
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<Self, String> {
        let url = url.trim();
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            format!(
                "regions.webhook is not a URL ({e}); expected e.g. https://ops.example/hooks/ferry"
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("regions.webhook: use an http:// or https:// URL".into());
        }
        let shown = shown(&parsed);
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(TIMEOUT)
            .timeout(TIMEOUT)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!("regions.webhookCaFile: cannot read {}: {e}", path.display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    format!(
                        "regions.webhookCaFile: {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                        path.display()
                    )
                })?;
            if parsed.scheme() == "http" {
                tracing::warn!(webhook = %shown, "regions.webhookCaFile is set but the webhook is http://: the CA is not used");
            }
            b = b.tls_certs_merge(certs);
        }
        let token = match token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "regions.webhookTokenFile: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                let t = text.lines().next().map(str::trim).unwrap_or_default();
                if t.is_empty() {
                    return Err(format!(
                        "regions.webhookTokenFile: {} is empty; put the token on its first line",
                        path.display()
                    ));
                }
                if parsed.scheme() == "http" {
                    tracing::warn!(webhook = %shown, "regions.webhookTokenFile is set but the webhook is http://: the token crosses the network in clear; use an https:// webhook");
                }
                Some(Arc::from(t))
            }
        };
        let client = b
            .build()
            .map_err(|e| format!("regions.webhook: cannot set up the HTTP client: {e}"))?;
        Ok(Self {
            url: url.to_string(),
            shown,
            client,
            token,
        })
    }

    /// Posts `a`; why it failed, if it did.
    pub async fn deliver(&self, a: &Announcement) -> Result<(), String> {
        let mut req = self.client.post(&self.url).json(a);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP status: the webhook answered {}", r.status())),
            Err(e) => Err(why(e)),
        }
    }
}

impl Announce for Webhook {
    fn announce(&self, a: Announcement) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.deliver(&a).await {
                Ok(()) => tracing::info!(
                    webhook = %me.shown, event = a.event, actor = %a.actor, epoch = %a.epoch,
                    "region event sent to the webhook"
                ),
                Err(why) => tracing::warn!(
                    webhook = %me.shown, event = a.event, actor = %a.actor, epoch = %a.epoch,
                    "the region event was not delivered to the webhook (not retried): {why}"
                ),
            }
        });
    }
}

/// `url` as logged: `scheme://host:port`, and `/…` when it has more.
fn shown(url: &reqwest::Url) -> String {
    let mut s = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(p) = url.port() {
        s.push_str(&format!(":{p}"));
    }
    if url.path() != "/" || url.query().is_some() {
        s.push_str("/…");
    }
    s
}

/// Why a request failed, by kind, without the URL.
fn why(e: reqwest::Error) -> String {
    let (timeout, connect) = (e.is_timeout(), e.is_connect());
    let e = e.without_url();
    let mut chain = vec![e.to_string()];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(c) = cur {
        chain.push(c.to_string());
        cur = c.source();
    }
    let root = chain.last().cloned().unwrap_or_default();
    let all = chain.join(": ").to_lowercase();
    let tls = [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "peer is incompatible",
    ]
    .iter()
    .any(|w| all.contains(w));
    if tls {
        format!(
            "TLS: {root}; the webhook's certificate must chain to the system's roots or to regions.webhookCaFile, and name its host"
        )
    } else if timeout {
        format!(
            "timed out after {}: {root}",
            humantime::format_duration(TIMEOUT)
        )
    } else if connect {
        format!("cannot connect: {root}")
    } else {
        format!("the request failed: {root}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::tls::{ClientAuth, ServerTls, TlsFiles};
    use ferry_testkit::pki::{Leaf, Pki};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback HTTPS endpoint answering `status` to every request, with
    /// `leaf`'s certificate; its URL and each request's head and body.
    async fn receiver(
        leaf: &Leaf,
        status: u16,
    ) -> (
        String,
        tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    ) {
        let files = TlsFiles::new("webhook-test", &leaf.cert, &leaf.key, &leaf.ca);
        let tls = ServerTls::load(files, ClientAuth::None, &[b"http/1.1"], TIMEOUT).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/hooks/s3cret",
            listener.local_addr().unwrap().port()
        );
        let mut accepted = ferry_core::tls::accept(listener, tls, Arc::new(|| {}), None);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((mut s, _)) = accepted.recv().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(Ok(n)) = tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        let _ = tx.send((head.to_string(), body.to_string()));
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = s.write_all(answer.as_bytes()).await;
                        let _ = s.shutdown().await;
                        break;
                    }
                }
            }
        });
        (url, rx)
    }

    fn announcement() -> Announcement {
        Announcement {
            event: "promoted",
            region: "west".into(),
            primary: "west".into(),
            epoch: RegionEpoch(2),
            actor: "alice".into(),
            reason: Some("switchover from east".into()),
            at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn an_https_webhook_is_reached_with_its_ca_and_failures_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "hooks");
        let leaf = pki.issue("receiver", &["127.0.0.1"]);
        let token = dir.path().join("hook.token");
        std::fs::write(&token, "hook-t0ken\n").unwrap();
        let (url, mut got) = receiver(&leaf, 200).await;
        let ca = pki.ca_file();
        // With the private CA: delivered over TLS, with the token.
        let hook = Webhook::new(&url, Some(&ca), Some(&token)).unwrap();
        hook.deliver(&announcement()).await.unwrap();
        let (head, body) = got.recv().await.unwrap();
        assert!(head.starts_with("POST /hooks/s3cret "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer hook-t0ken"),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["actor"], "alice", "{v}");
        assert_eq!(v["event"], "promoted");
        assert_eq!(v["epoch"], 2);
        assert_eq!(v["reason"], "switchover from east");
        // Without it the system's roots do not know the CA: a TLS failure,
        // saying what to set, without the URL's path.
        let untrusting = Webhook::new(&url, None, None).unwrap();
        let e = untrusting.deliver(&announcement()).await.unwrap_err();
        assert!(e.starts_with("TLS: "), "{e}");
        assert!(
            e.contains("regions.webhookCaFile") && !e.contains("s3cret"),
            "{e}"
        );
        // A refusal names the status.
        let (url500, _got) = receiver(&leaf, 500).await;
        let e = Webhook::new(&url500, Some(&ca), None)
            .unwrap()
            .deliver(&announcement())
            .await
            .unwrap_err();
        assert!(e.starts_with("HTTP status") && e.contains("500"), "{e}");
        // Nobody listening: the connection.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = Webhook::new(&format!("https://127.0.0.1:{port}/x"), Some(&ca), None)
            .unwrap()
            .deliver(&announcement())
            .await
            .unwrap_err();
        assert!(e.starts_with("cannot connect"), "{e}");
    }

    #[test]
    fn a_logged_url_shows_no_path_or_query() {
        let u = |s: &str| shown(&reqwest::Url::parse(s).unwrap());
        assert_eq!(
            u("https://hooks.example/services/T0/B0/s3cret"),
            "https://hooks.example/…"
        );
        assert_eq!(u("http://127.0.0.1:9000/"), "http://127.0.0.1:9000");
        assert_eq!(u("https://h:8443?key=s3cret"), "https://h:8443/…");
    }

    #[test]
    fn setup_errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Webhook::new("ftp://h/x", None, None).unwrap_err();
        assert!(e.contains("http:// or https://"), "{e}");
        let missing = dir.path().join("nope.pem");
        let e = Webhook::new("https://h/x", Some(&missing), None).unwrap_err();
        assert!(
            e.contains("regions.webhookCaFile") && e.contains("nope.pem"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = Webhook::new("https://h/x", Some(&junk), None).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let empty = dir.path().join("token");
        std::fs::write(&empty, "\n").unwrap();
        let e = Webhook::new("https://h/x", None, Some(&empty)).unwrap_err();
        assert!(
            e.contains("regions.webhookTokenFile") && e.contains("empty"),
            "{e}"
        );
        std::fs::write(&empty, "t0ken\n").unwrap();
        let w = Webhook::new("https://h/x/s3cret", None, Some(&empty)).unwrap();
        let debug = format!("{w:?}");
        assert!(
            !debug.contains("t0ken") && !debug.contains("s3cret"),
            "{debug}"
        );
    }
}
