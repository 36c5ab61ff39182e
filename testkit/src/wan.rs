//! A WAN-like link on loopback ([`WanLink`]): a TCP proxy that behaves like
//! a long-distance network path instead of a slow one. Every byte arrives
//! half a round-trip time after it was sent, in each direction, while the
//! bytes behind it keep flowing (a delay line: throughput is not divided
//! by the delay, as it is when a proxy sleeps before forwarding each
//! chunk). A new connection's first bytes leave only one round trip after
//! it was opened (the TCP handshake), so a request on a fresh connection
//! costs two round trips and one on a kept-alive connection one, as over a
//! real network. An optional bandwidth limit is shared by all connections
//! of the link in each direction (bytes queue behind each other).
//!
//! The regions of `ferry bench region --rtt` and `ferry bench replication
//! --rtt` reach each other — the global cluster's routes, another
//! region's store and REST API — through these links.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the link is like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WanSettings {
    /// Round-trip time: each direction delays every byte by half of it.
    pub rtt: Duration,
    /// Bytes per second in each direction, shared by the link's
    /// connections; `None`: no limit beyond the machine's.
    pub bandwidth: Option<u64>,
}

/// Chunks in flight per connection and direction (at most 64 KiB each):
/// a bound on what a link holds in memory, above any bandwidth-delay
/// product the benchmarks use (1 GB/s × 50 ms).
const IN_FLIGHT_CHUNKS: usize = 1024;
const CHUNK: usize = 64 * 1024;

/// One direction's bandwidth: when the link is free to send again.
#[derive(Default)]
struct Pacer {
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    /// When `n` bytes ready at `ready` have left the sender's side, given
    /// `bandwidth` bytes per second shared with earlier bytes.
    fn depart(&self, ready: Instant, n: usize, bandwidth: Option<u64>) -> Instant {
        let Some(bw) = bandwidth.filter(|b| *b > 0) else {
            return ready;
        };
        let mut free = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = free.map_or(ready, |f| f.max(ready));
        let done = start + Duration::from_secs_f64(n as f64 / bw as f64);
        *free = Some(done);
        done
    }
}

/// A WAN-like TCP link from a loopback port to `target`; ends (with every
/// connection through it) when dropped.
pub struct WanLink {
    pub port: u16,
    settings: WanSettings,
    stop: CancellationToken,
}

impl WanLink {
    /// Listens on a free loopback port and forwards every connection to
    /// `target` as a link with `settings` would.
    pub async fn start(target: SocketAddr, settings: WanSettings) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stop = CancellationToken::new();
        let up = Arc::new(Pacer::default());
        let down = Arc::new(Pacer::default());
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((c, _)) => c,
                        // Out of descriptors and the like: keep serving.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let opened = Instant::now();
                let (s, up, down) = (s.clone(), up.clone(), down.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return; // dropping `inbound` closes it: refused
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    // Nothing crosses before the handshake's round trip.
                    let open_at = opened + settings.rtt;
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    let a = delay_line(in_r, out_w, open_at, settings, up);
                    let b = delay_line(out_r, in_w, open_at, settings, down);
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = async { tokio::join!(a, b) } => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            settings,
            stop,
        })
    }

    /// What the link is like.
    pub fn settings(&self) -> WanSettings {
        self.settings
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>` (an HTTP server such as an S3 endpoint).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One direction: a reader stamps each chunk with the time it arrives at
/// the far end and queues it; a writer delivers it then. The queue is
/// bounded ([`IN_FLIGHT_CHUNKS`]): a receiver that stops reading stops the
/// sender, as TCP's window would.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    open_at: Instant,
    settings: WanSettings,
    pacer: Arc<Pacer>,
) {
    let one_way = settings.rtt / 2;
    // `None`: the sender closed its side.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(IN_FLIGHT_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let ready = Instant::now().max(open_at);
            let due = pacer.depart(ready, n, settings.bandwidth) + one_way;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            let end = chunk.is_none();
            if tx.send((due, chunk)).await.is_err() || end {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(c) => {
                    if to.write_all(&c).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(c: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        c.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        back
    }

    #[tokio::test]
    async fn a_request_costs_a_round_trip_and_a_new_connection_one_more() {
        let rtt = Duration::from_millis(80);
        let link = WanLink::start(
            echo().await,
            WanSettings {
                rtt,
                bandwidth: None,
            },
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        let mut c = TcpStream::connect(link.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"hello").await, b"hello");
        let first = t0.elapsed();
        assert!(first >= rtt * 2, "first request took {first:?}");
        let t1 = Instant::now();
        assert_eq!(roundtrip(&mut c, b"again").await, b"again");
        let second = t1.elapsed();
        assert!(second >= rtt, "second request took {second:?}");
        // Generous: a loaded machine adds scheduling delay, never less.
        assert!(second < rtt + Duration::from_secs(2), "{second:?}");
    }

    #[tokio::test]
    async fn bytes_flow_behind_each_other_not_one_delay_per_chunk() {
        // 16 MiB across a 200 ms link: a proxy that waited one delay per
        // 64 KiB chunk would need 256 delays (over 25 s); a delay line
        // needs about one.
        let rtt = Duration::from_millis(200);
        let link = WanLink::start(
            echo().await,
            WanSettings {
                rtt,
                bandwidth: None,
            },
        )
        .await
        .unwrap();
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let c = TcpStream::connect(link.addr()).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let t0 = Instant::now();
        let sent = data.clone();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.unwrap() });
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).await.unwrap();
        writer.await.unwrap();
        let took = t0.elapsed();
        assert!(back == data, "the bytes changed on the way");
        assert!(took >= rtt * 2, "took {took:?}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    #[tokio::test]
    async fn bandwidth_is_shared_by_the_links_connections() {
        // Two connections each send 256 KiB one way at 1 MiB/s shared:
        // the last byte cannot arrive before 0.5 s.
        let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = sink.local_addr().unwrap();
        let (done_tx, mut done_rx) = mpsc::channel(2);
        tokio::spawn(async move {
            while let Ok((mut c, _)) = sink.accept().await {
                let done = done_tx.clone();
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    c.read_to_end(&mut all).await.unwrap();
                    let _ = done.send(all.len()).await;
                });
            }
        });
        let link = WanLink::start(
            addr,
            WanSettings {
                rtt: Duration::from_millis(2),
                bandwidth: Some(1 << 20),
            },
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        for _ in 0..2 {
            let mut c = TcpStream::connect(link.addr()).await.unwrap();
            tokio::spawn(async move {
                c.write_all(&vec![7u8; 256 << 10]).await.unwrap();
                c.shutdown().await.unwrap();
            });
        }
        let (a, b) = (done_rx.recv().await, done_rx.recv().await);
        let took = t0.elapsed();
        assert_eq!((a, b), (Some(256 << 10), Some(256 << 10)));
        assert!(took >= Duration::from_millis(500), "took {took:?}");
    }
}
