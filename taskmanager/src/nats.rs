//! NATS connections of the JetStream source and sink: one client per
//! subtask, connected when the task is deployed.
//!
//! The first connection must succeed (an unreachable server fails the
//! deployment, and the restart strategy applies); after that the client
//! reconnects on its own, and requests that time out meanwhile fail the
//! task.

use std::time::Duration;

use async_nats::jetstream;
use ferry_core::config::redact_url;
use ferry_core::spec::nats::server_urls;

/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a JetStream request (stream info, consumer create, publish ack)
/// may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the servers of `url` (comma-separated) and returns a
/// JetStream context. `name` identifies the connection in server monitoring.
pub async fn connect(url: &str, name: &str) -> Result<jetstream::Context, String> {
    let urls = server_urls(url)?;
    let addrs = urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("bad NATS URL '{}': {e}", redact_url(u)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The client library does not read credentials from the URL itself.
    let options = match urls
        .iter()
        .find_map(|u| ferry_core::config::url_userinfo(u))
    {
        Some((user, Some(password))) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some((token, None)) => async_nats::ConnectOptions::with_token(token),
        None => async_nats::ConnectOptions::new(),
    };
    let client = options
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .max_reconnects(None)
        .connect(addrs)
        .await
        .map_err(|e| format!("cannot connect to NATS at {}: {e}", redact_url(url)))?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client))
}

/// Opens a stream by name, saying how to create it when it is missing.
pub async fn stream(
    js: &jetstream::Context,
    name: &str,
    url: &str,
) -> Result<jetstream::stream::Stream, String> {
    use jetstream::context::GetStreamErrorKind;
    let url = redact_url(url);
    js.get_stream(name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.code() == 404 => format!(
            "JetStream stream '{name}' does not exist on {url}; create it first (e.g. `nats stream add {name}`)"
        ),
        _ => format!("cannot open JetStream stream '{name}' on {url}: {e}"),
    })
}
