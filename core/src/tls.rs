//! TLS material for Ferry's links (rustls, aws-lc-rs): PEM certificates,
//! keys and CAs read from files, the rustls server and client configs
//! built from them, and their reload when the files change — cert-manager
//! rotates a Secret's files in place — with no restart. Connections made
//! after a reload use the new material; open ones keep theirs until they
//! close.
//!
//! Also owns the two transports the JobManager ↔ TaskManager gRPC link
//! runs over when `tls.grpc` is set: [`incoming`] (a TaskManager's
//! accepted connections, each handshake on a task of its own so one slow
//! or hostile client never holds up the others) and [`Connector`] (a
//! JobManager dialing a TaskManager; also the trace exporter dialing an
//! `https://` OTLP collector, with [`public_client_config`]).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::codegen::http::Uri;

/// A TLS handshake that has not finished after this long is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A problem with TLS material, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// The files of one link's TLS material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Which link, for messages (`grpc`, `api`, ...).
    pub link: &'static str,
    /// This side's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// This side's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates (PEM) the other side's certificate must chain to.
    pub ca: PathBuf,
    /// A server's second CA (PEM) for clients of another kind — the REST
    /// API's callers — whose certificates it takes besides the link CA's
    /// ([`ClientAuth::Optional`]).
    pub callers_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of `link` with no callers' CA.
    pub fn new(link: &'static str, cert: &Path, key: &Path, ca: &Path) -> Self {
        Self {
            link,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
            callers_ca: None,
        }
    }
}

/// Whether a server asks its clients for a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Clients need no certificate.
    None,
    /// A client must present a certificate signed by the CA.
    Required,
    /// ... that also names this DNS name (a subject alternative name):
    /// of all the certificates the CA signs, only those of this role.
    RequiredNamed(String),
    /// A client may present a certificate signed by the link CA (a peer of
    /// this server's own kind) or by [`TlsFiles::callers_ca`]; one that
    /// presents none is still served (it authenticates otherwise).
    Optional,
}

/// The bytes of one link's files, with a fingerprint to see them change.
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    callers_ca: Option<Vec<u8>>,
    fingerprint: [u8; 32],
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                TlsError(format!(
                    "tls.{}: cannot read the {what} file {}: {e}",
                    files.link,
                    path.display()
                ))
            })
        };
        let cert = read("certificate", &files.cert)?;
        let key = read("key", &files.key)?;
        let ca = read("CA", &files.ca)?;
        let callers_ca = match &files.callers_ca {
            Some(p) => Some(read("callers' CA", p)?),
            None => None,
        };
        let mut h = Sha256::new();
        for part in [&cert, &key, &ca].into_iter().chain(callers_ca.as_ref()) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Ok(Self {
            cert,
            key,
            ca,
            callers_ca,
            fingerprint: h.finalize().into(),
        })
    }

    fn certs(&self, files: &TlsFiles) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        pem_certs(
            &self.cert,
            &format!("tls.{}", files.link),
            "certificate",
            &files.cert,
        )
    }

    fn key(&self, files: &TlsFiles) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            TlsError(format!(
                "tls.{}: the key file {} holds no usable private key (PEM PKCS#8, PKCS#1 or SEC1): {e}",
                files.link,
                files.key.display()
            ))
        })
    }

    fn roots(&self, files: &TlsFiles) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        add_roots(
            &mut roots,
            &self.ca,
            &format!("tls.{}", files.link),
            &files.ca,
        )?;
        Ok(roots)
    }

    /// The link CA's roots plus the callers' CA's.
    fn roots_with_callers(&self, files: &TlsFiles) -> Result<RootCertStore, TlsError> {
        let mut roots = self.roots(files)?;
        if let (Some(bytes), Some(path)) = (&self.callers_ca, &files.callers_ca) {
            add_roots(&mut roots, bytes, "api.auth.clientCertificates", path)?;
        }
        Ok(roots)
    }
}

/// Adds the CA certificates of the PEM file `path` (read as `bytes`) to
/// `roots`; `at` is the config key, for messages.
fn add_roots(
    roots: &mut RootCertStore,
    bytes: &[u8],
    at: &str,
    path: &Path,
) -> Result<(), TlsError> {
    for cert in pem_certs(bytes, at, "CA", path)? {
        roots.add(cert).map_err(|e| {
            TlsError(format!(
                "{at}: the CA file {} holds a certificate that is not a usable CA: {e}",
                path.display()
            ))
        })?;
    }
    Ok(())
}

/// The certificates of a PEM file's `bytes`; `at` is the config key, for
/// messages.
fn pem_certs(
    bytes: &[u8],
    at: &str,
    what: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{at}: the {what} file {} is not PEM certificates: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{at}: the {what} file {} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn rustls_error(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError(format!(
        "tls.{}: the certificate {} and key {} do not make a usable identity: {e}",
        files.link,
        files.cert.display(),
        files.key.display()
    ))
}

type Build<C> = dyn Fn(&Material) -> Result<C, TlsError> + Send + Sync;

/// A config built from files, rebuilt when they change.
struct Reloading<C> {
    files: TlsFiles,
    build: Box<Build<C>>,
    current: RwLock<(Arc<C>, [u8; 32])>,
}

impl<C: Send + Sync + 'static> Reloading<C> {
    fn load(files: TlsFiles, build: Box<Build<C>>) -> Result<Arc<Self>, TlsError> {
        let m = Material::read(&files)?;
        let config = build(&m)?;
        Ok(Arc::new(Self {
            files,
            build,
            current: RwLock::new((Arc::new(config), m.fingerprint)),
        }))
    }

    fn current(&self) -> Arc<C> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Reads the files again; rebuilds when they changed. `Ok(true)` when
    /// new material is in use. Material that does not build (a rotation
    /// caught halfway: a new certificate beside the old key) leaves the
    /// old in use.
    fn check(&self) -> Result<bool, TlsError> {
        let m = Material::read(&self.files)?;
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == m.fingerprint {
            return Ok(false);
        }
        let config = (self.build)(&m)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            (Arc::new(config), m.fingerprint);
        Ok(true)
    }

    /// Checks the files every `every` while anyone holds this config.
    /// Outside a tokio runtime (tests of pure logic) nothing is spawned.
    fn watch(self: &Arc<Self>, every: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        rt.spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let Some(me) = weak.upgrade() else { return };
                match me.check() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(link = me.files.link, cert = %me.files.cert.display(), "TLS material changed on disk: new connections use it");
                    }
                    Ok(false) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(link = me.files.link, "keeping the TLS material in use: {e}");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

/// What a server's files build: the config new connections use, and a
/// verifier of the link CA alone, to tell a peer of the server's own kind
/// from a caller ([`ServerTls::from_link_ca`]).
struct ServerBuilt {
    config: Arc<ServerConfig>,
    link_peers: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

/// A server's TLS config, reloaded when its files change. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls(Arc<Reloading<ServerBuilt>>);

impl ServerTls {
    /// Loads `files`, offering `alpn` (e.g. `h2`), and checks them again
    /// every `reload` from then on.
    pub fn load(
        files: TlsFiles,
        client_auth: ClientAuth,
        alpn: &[&[u8]],
        reload: Duration,
    ) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let f = files.clone();
        let r = Reloading::load(
            files,
            Box::new(move |m| Self::build(m, &f, &client_auth, &alpn)),
        )?;
        r.watch(reload);
        Ok(Self(r))
    }

    fn build(
        m: &Material,
        files: &TlsFiles,
        client_auth: &ClientAuth,
        alpn: &[Vec<u8>],
    ) -> Result<ServerBuilt, TlsError> {
        let verifier = |roots: RootCertStore, optional: bool| {
            let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let b = if optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build().map_err(|e| {
                TlsError(format!(
                    "tls.{}: cannot verify clients against the CA file {}: {e}",
                    files.link,
                    files.ca.display()
                ))
            })
        };
        // Also checks the CA file: it is this link's declared trust, and a
        // typo there should show at start even when clients need none.
        let link_peers = verifier(m.roots(files)?, false)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| rustls_error(files, e))?;
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required => builder.with_client_cert_verifier(link_peers.clone()),
            ClientAuth::RequiredNamed(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|e| {
                    TlsError(format!(
                        "tls.{}: {name:?} is not a DNS name a client certificate can carry: {e}",
                        files.link
                    ))
                })?;
                builder.with_client_cert_verifier(Arc::new(NamedClients {
                    inner: link_peers.clone(),
                    name,
                }))
            }
            ClientAuth::Optional => {
                builder.with_client_cert_verifier(verifier(m.roots_with_callers(files)?, true)?)
            }
        };
        let mut config = builder
            .with_single_cert(m.certs(files)?, m.key(files)?)
            .map_err(|e| rustls_error(files, e))?;
        config.alpn_protocols = alpn.to_vec();
        Ok(ServerBuilt {
            config: Arc::new(config),
            link_peers,
        })
    }

    /// The config new connections use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.0.current().config.clone()
    }

    /// Reads the files again now (what the reload task does on its own).
    pub fn reload(&self) -> Result<bool, TlsError> {
        self.0.check()
    }

    /// Whether a client's certificate `chain` (leaf first, as the
    /// handshake verified it) chains to the link CA — a peer of this
    /// server's own kind, such as another JobManager — rather than only to
    /// the callers' CA.
    pub fn from_link_ca(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.0
            .current()
            .link_peers
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}

/// The names a certificate carries, for matching it to an identity: its
/// subject common names, DNS names and URIs (e.g. `spiffe://...`), in that
/// order. Empty for bytes that are not a certificate.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, x509)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = x509
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_string)
        .collect();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::URI(u) => names.push(u.to_string()),
                _ => {}
            }
        }
    }
    names
}

/// A client verifier that takes only certificates of the CA that also
/// carry one name: the CA may sign other roles' certificates too (a
/// TaskManager's), and those must not pass for a JobManager's.
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    name: ServerName<'static>,
}

impl rustls::server::danger::ClientCertVerifier for NamedClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        webpki::EndEntityCert::try_from(end_entity)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(&self.name))
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client's TLS config (with its own certificate, for mutual TLS),
/// reloaded when its files change. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls(Arc<Reloading<ClientConfig>>);

impl ClientTls {
    /// Loads `files` (the certificate and key are this client's identity),
    /// asking for `alpn`, and checks them again every `reload` from then on.
    pub fn load(files: TlsFiles, alpn: &[&[u8]], reload: Duration) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let f = files.clone();
        let r = Reloading::load(
            files,
            Box::new(move |m| {
                let mut config = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| rustls_error(&f, e))?
                    .with_root_certificates(m.roots(&f)?)
                    .with_client_auth_cert(m.certs(&f)?, m.key(&f)?)
                    .map_err(|e| rustls_error(&f, e))?;
                config.alpn_protocols = alpn.clone();
                Ok(config)
            }),
        )?;
        r.watch(reload);
        Ok(Self(r))
    }

    /// The config new connections use.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.0.current()
    }

    /// Reads the files again now (what the reload task does on its own).
    pub fn reload(&self) -> Result<bool, TlsError> {
        self.0.check()
    }
}

/// A one-off client config from PEM files — trusting the CAs in `ca`,
/// presenting `identity` (certificate chain, key) when given — for links
/// whose client library reads the files itself (NATS) and that need the
/// same trust to check them at start or find out why a handshake fails.
/// `at` is the config key (`nats.tls`), for messages.
pub fn client_config(
    at: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let read = |what: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            TlsError(format!(
                "{at}: cannot read the {what} file {}: {e}",
                path.display()
            ))
        })
    };
    let mut roots = RootCertStore::empty();
    for cert in pem_certs(&read("CA", ca)?, at, "CA", ca)? {
        roots.add(cert).map_err(|e| {
            TlsError(format!(
                "{at}: the CA file {} holds a certificate that is not a usable CA: {e}",
                ca.display()
            ))
        })?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("{at}: {e}")))?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = pem_certs(&read("certificate", cert)?, at, "certificate", cert)?;
            let key_der = PrivateKeyDer::from_pem_slice(&read("key", key)?).map_err(|e| {
                TlsError(format!(
                    "{at}: the key file {} holds no usable private key (PEM PKCS#8, PKCS#1 or SEC1): {e}",
                    key.display()
                ))
            })?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                TlsError(format!(
                    "{at}: the certificate {} and key {} do not make a usable identity: {e}",
                    cert.display(),
                    key.display()
                ))
            })
        }
    }
}

/// A client config for a server outside Ferry's own PKI (an OTLP
/// collector): its certificate must chain to the system's roots (as the
/// HTTP clients check them) or to a CA in the PEM file `extra_ca`; no
/// client certificate; asking for `alpn`. `at` names the setting, for
/// messages.
pub fn public_client_config(
    at: &str,
    extra_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let extra = match extra_ca {
        None => Vec::new(),
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| {
                TlsError(format!(
                    "{at}: cannot read the CA file {}: {e}",
                    path.display()
                ))
            })?;
            pem_certs(&bytes, at, "CA", path)?
        }
    };
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider())
        .map_err(|e| {
            TlsError(format!(
                "{at}: cannot set up certificate verification ({e}); give the server's CA as a PEM file"
            ))
        })?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("{at}: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server-side TLS connection.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS connections accepted on `listener`, for
/// `tonic::transport::Server::serve_with_incoming*`. Each handshake runs on
/// a task of its own, bounded by [`HANDSHAKE_TIMEOUT`]; a failed one (a
/// plaintext client, no certificate, one from another CA) is logged with
/// the peer's address, counted by `refused` and never reaches the server.
/// Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    refused: Refused,
) -> impl Stream<Item = io::Result<ServerStream>> + Send + 'static {
    let mut rx = accept(listener, tls, refused, None);
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(|(s, _)| Ok(s))))
}

/// What a TLS port answers a client that sent a plaintext HTTP request
/// (e.g. `http://` instead of `https://`), instead of a bare hang-up.
pub type PlaintextAnswer = &'static [u8];

/// Called once for every connection refused in the handshake (a metric).
pub type Refused = Arc<dyn Fn() + Send + Sync>;

/// The TLS connections accepted on `listener`, with their peers, as
/// [`incoming`] describes. With `plaintext`, a client whose first bytes
/// look like an HTTP request gets that answer and is closed.
pub fn accept(
    listener: TcpListener,
    tls: ServerTls,
    failures: Refused,
    plaintext: Option<PlaintextAnswer>,
) -> mpsc::Receiver<(ServerStream, std::net::SocketAddr)> {
    let (tx, rx) = mpsc::channel::<(ServerStream, std::net::SocketAddr)>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(
                        link = tls.0.files.link,
                        "accepting a connection failed: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let (tx, failures, link) = (tx.clone(), failures.clone(), tls.0.files.link);
            tokio::spawn(async move {
                let refused = |why: String| {
                    failures();
                    tracing::warn!(link, %peer, "refused a connection: {why}");
                };
                let handshake = async {
                    if let Some(answer) = plaintext
                        && looks_like_http(&tcp).await
                    {
                        let mut tcp = tcp;
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, answer).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tcp).await;
                        return Err("a plaintext HTTP request on a TLS port (told to use https)"
                            .to_string());
                    }
                    acceptor
                        .accept(tcp)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(why)) => refused(why),
                    Err(_) => refused(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")),
                }
            });
        }
    });
    rx
}

/// True when the first bytes on `tcp` are an HTTP/1 request line (a TLS
/// client starts with a handshake record, byte 0x16).
async fn looks_like_http(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 8];
    let Ok(n) = tcp.peek(&mut buf).await else {
        return false;
    };
    let head = &buf[..n];
    [
        "GET ", "POST", "PUT ", "DELE", "HEAD", "OPTI", "PATC", "CONN", "TRAC",
    ]
    .iter()
    .any(|m| head.starts_with(m.as_bytes()))
}

/// Dials `https://host:port` URIs over TLS for a tonic `Endpoint`
/// (`connect_with_connector_lazy`), verifying the server's certificate
/// against the CA — for `server_name` when given (one name in every
/// TaskManager's certificate, whatever address it advertises), else for
/// the URI's host — and presenting this side's certificate.
#[derive(Clone)]
pub struct Connector {
    tls: ConnectorConfig,
    server_name: Option<String>,
}

/// Where a [`Connector`] takes its client config from.
#[derive(Clone)]
enum ConnectorConfig {
    /// Files, reloaded when they change.
    Reloading(ClientTls),
    /// Built once ([`public_client_config`]).
    Fixed(Arc<ClientConfig>),
}

impl Connector {
    pub fn new(tls: ClientTls, server_name: Option<String>) -> Self {
        Self {
            tls: ConnectorConfig::Reloading(tls),
            server_name,
        }
    }

    /// A connector with one config that never changes (e.g. from
    /// [`public_client_config`]), checking the URI's host.
    pub fn fixed(config: Arc<ClientConfig>) -> Self {
        Self {
            tls: ConnectorConfig::Fixed(config),
            server_name: None,
        }
    }
}

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = match &self.tls {
            ConnectorConfig::Reloading(tls) => tls.config(),
            ConnectorConfig::Fixed(config) => config.clone(),
        };
        let name = self.server_name.clone();
        Box::pin(async move {
            let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} names no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = name.unwrap_or(host);
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| invalid(format!("{name:?} is not a TLS server name: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use ferry_testkit::pki::{Leaf, Pki};
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::codegen::Service;

    use super::*;

    fn files(leaf: &Leaf) -> TlsFiles {
        TlsFiles::new("grpc", &leaf.cert, &leaf.key, &leaf.ca)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_servers_own_ca_tells_its_peers_from_callers_of_the_callers_ca() {
        let dir = tempfile::tempdir().unwrap();
        let region = Pki::new(dir.path(), "region");
        let callers = Pki::new(dir.path(), "callers");
        let jm = region.issue("jm", &["jm-0.ferry.test"]);
        let ci = callers.issue("ci-bot", &["ci-bot.ferry.test"]);
        let mut f = files(&jm);
        f.callers_ca = Some(callers.ca_file());
        let tls = ServerTls::load(f, ClientAuth::Optional, &[], HOUR).unwrap();
        let chain = |leaf: &Leaf| {
            CertificateDer::pem_file_iter(&leaf.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        assert!(tls.from_link_ca(&chain(&jm)));
        assert!(!tls.from_link_ca(&chain(&ci)));
        assert!(!tls.from_link_ca(&[]));
        assert_eq!(
            certificate_names(&chain(&ci)[0]),
            vec!["ci-bot".to_string(), "ci-bot.ferry.test".to_string()]
        );
        assert!(certificate_names(&CertificateDer::from(vec![1u8, 2, 3])).is_empty());
        // The callers' CA file is part of the material: a broken one is
        // named at start.
        let mut f = files(&jm);
        f.callers_ca = Some(dir.path().join("missing.pem"));
        let e = ServerTls::load(f, ClientAuth::Optional, &[], HOUR)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("callers' CA") && e.contains("missing.pem"),
            "{e}"
        );
    }

    #[test]
    fn rotated_files_are_picked_up_and_a_half_done_rotation_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "region");
        let leaf = pki.issue("tm", &["localhost"]);
        let tls = ServerTls::load(files(&leaf), ClientAuth::Required, &[b"h2"], HOUR).unwrap();
        let first = tls.config();
        assert_eq!(first.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(!tls.reload().unwrap(), "nothing changed yet");
        assert!(Arc::ptr_eq(&first, &tls.config()));

        pki.write(&leaf, "tm", &["localhost"]);
        assert!(tls.reload().unwrap(), "a new certificate and key");
        let second = tls.config();
        assert!(!Arc::ptr_eq(&first, &second));

        // Halfway through a rotation: a new certificate beside the old key.
        let other = pki.issue("other", &["localhost"]);
        std::fs::copy(&other.cert, &leaf.cert).unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(
            err.contains("tls.grpc") && err.contains("do not make a usable identity"),
            "{err}"
        );
        assert!(
            Arc::ptr_eq(&second, &tls.config()),
            "the old material stays in use"
        );
    }

    #[test]
    fn unusable_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "region");
        let leaf = pki.issue("tm", &["localhost"]);
        let mut f = files(&leaf);
        f.ca = dir.path().join("missing-ca.crt");
        let err = ClientTls::load(f, &[], HOUR).err().unwrap().to_string();
        assert!(
            err.contains("cannot read the CA file") && err.contains("missing-ca.crt"),
            "{err}"
        );

        std::fs::write(&leaf.key, "not a key").unwrap();
        let err = ServerTls::load(files(&leaf), ClientAuth::None, &[], HOUR)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("holds no usable private key") && err.contains("tls.key"),
            "{err}"
        );

        std::fs::write(&leaf.cert, "").unwrap();
        let err = ServerTls::load(files(&leaf), ClientAuth::None, &[], HOUR)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("holds no certificate"), "{err}");
    }

    /// Accepts with mutual TLS on loopback and answers `ok` on every
    /// connection that got through.
    async fn server(leaf: &Leaf) -> (std::net::SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTls::load(files(leaf), ClientAuth::Required, &[], HOUR).unwrap();
        let failures = Arc::new(AtomicU64::new(0));
        let counted = failures.clone();
        let mut conns = Box::pin(incoming(
            listener,
            tls,
            Arc::new(move || {
                counted.fetch_add(1, Ordering::Relaxed);
            }),
        ));
        tokio::spawn(async move {
            while let Some(Ok(mut c)) = conns.next().await {
                let _ = c.write_all(b"ok").await;
                let _ = c.shutdown().await;
            }
        });
        (addr, failures)
    }

    async fn dial(addr: std::net::SocketAddr, leaf: &Leaf) -> io::Result<Vec<u8>> {
        let tls = ClientTls::load(files(leaf), &[], HOUR).unwrap();
        let mut c = Connector::new(tls, Some("localhost".into()));
        let uri: Uri = format!("https://{addr}").parse().unwrap();
        let mut io = c.call(uri).await?.into_inner();
        let mut out = Vec::new();
        io.read_to_end(&mut out).await?;
        Ok(out)
    }

    async fn failures_reach(failures: &AtomicU64, n: u64) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while failures.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the server counted the refused handshake");
    }

    #[tokio::test]
    async fn only_clients_with_a_certificate_of_the_ca_get_through() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "region");
        let (addr, failures) = server(&pki.issue("tm", &["localhost"])).await;

        assert_eq!(dial(addr, &pki.issue("jm", &["jm"])).await.unwrap(), b"ok");

        // A client certificate from another CA (that trusts the server).
        let rogue_pki = Pki::new(dir.path(), "rogue");
        let rogue = rogue_pki.issue("jm", &["jm"]);
        std::fs::copy(pki.ca_file(), &rogue.ca).unwrap();
        let answer = dial(addr, &rogue).await;
        assert!(
            answer.as_ref().map(|a| a.is_empty()).unwrap_or(true),
            "a certificate of another CA got an answer: {answer:?}"
        );
        failures_reach(&failures, 1).await;

        // Plaintext.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf).await;
        assert!(
            !buf.windows(2).any(|w| w == b"ok"),
            "plaintext got an answer"
        );
        failures_reach(&failures, 2).await;

        // A server whose certificate is not for the name the client expects.
        let (addr2, _) = server(&pki.issue("elsewhere", &["elsewhere.example"])).await;
        let err = dial(addr2, &pki.issue("jm2", &["jm"])).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
