//! The front door: mutual TLS on one TCP port (2376 by default) for every job.
//! Each connection: TLS handshake (client certificate required, TLS 1.2/1.3,
//! bounded in time), identity read once from the verified certificate, then
//! the admin job API or the proxy to that job's daemon. There is no plaintext
//! listener: a plain HTTP request gets a one-line 400 and the connection ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::jobs::Jobs;
use crate::pki::{Ca, Identity, PkiError, host_names};
use crate::proxy::{HttpLimits, RELAY_BUFFER};
use crate::refusals::{Reason, Refusals};
use crate::sandbox::Engine;
use crate::workers::Workers;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// CA, server and admin material (docker:dind layout plus `admin/`).
    pub certs_dir: PathBuf,
    /// Extra names and addresses for the server certificate.
    pub san: Vec<String>,
    pub handshake_timeout_secs: u64,
    pub header_timeout_secs: u64,
    /// A request body that sends nothing this long is cut (408).
    pub body_idle_timeout_secs: u64,
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
    /// How long shutdown waits for open connections before cutting them.
    pub drain_secs: u64,
    /// Sandboxes kept started so that a new job gets one at once (0: none).
    pub warm_pool: usize,
    /// Threads serving client connections (0: one per CPU).
    pub workers: usize,
    /// How long a job's audit file is kept after the job ends.
    pub audit_retention_secs: u64,
    /// Bound on one job's audit file; records past it are counted, not
    /// written.
    pub audit_max_bytes: u64,
    /// `[policy]` of the configuration file (a section of its own).
    #[serde(skip)]
    pub policy: crate::policy::Policy,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 2376)),
            certs_dir: "certs".into(),
            san: Vec::new(),
            handshake_timeout_secs: 10,
            header_timeout_secs: 30,
            body_idle_timeout_secs: 60,
            default_ttl_secs: 3600,
            max_ttl_secs: 24 * 3600,
            drain_secs: 10,
            warm_pool: 2,
            workers: 0,
            audit_retention_secs: 7 * 24 * 3600,
            audit_max_bytes: 16 << 20,
            policy: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {key}: {why}")]
    Config { key: &'static str, why: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot start the connection threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |key, why: &str| {
            Err(ServeError::Config {
                key,
                why: why.to_string(),
            })
        };
        if self.listen.port() == 2375 {
            return bad(
                "listen",
                "port 2375 is Docker's plaintext port; berth serves mutual TLS only (use 2376)",
            );
        }
        if self.handshake_timeout_secs == 0 || self.handshake_timeout_secs > 300 {
            return bad("handshake_timeout_secs", "must be 1..=300");
        }
        if self.header_timeout_secs == 0 || self.header_timeout_secs > 3600 {
            return bad("header_timeout_secs", "must be 1..=3600");
        }
        if self.body_idle_timeout_secs == 0 || self.body_idle_timeout_secs > 3600 {
            return bad("body_idle_timeout_secs", "must be 1..=3600");
        }
        if self.warm_pool > 64 {
            return bad(
                "warm_pool",
                "must be at most 64 (each warm sandbox holds about 115 MiB)",
            );
        }
        if let Err((key, why)) = self.policy.validate() {
            return Err(ServeError::Config { key, why });
        }
        if self.audit_max_bytes < 4096 {
            return bad("audit_max_bytes", "must be at least 4096");
        }
        if self.workers > 1024 {
            return bad("workers", "must be at most 1024 (0: one per CPU)");
        }
        if self.default_ttl_secs == 0 || self.default_ttl_secs > self.max_ttl_secs {
            return bad(
                "default_ttl_secs",
                "must be at least 1 and at most max_ttl_secs",
            );
        }
        Ok(())
    }
}

/// A bound, ready front door.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    jobs: Arc<Jobs>,
    workers: Workers,
    cfg: ServeConfig,
    admin_dir: PathBuf,
}

/// ring's suites with AES-128-GCM first: the cheapest per byte with AES-NI,
/// which matters when images stream through the proxy.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        (!name.contains("AES_128_GCM"), !name.contains("AES_256_GCM"))
    });
    p
}

fn tls_config(ca: &Ca, server: &crate::pki::Bundle) -> Result<rustls::ServerConfig, ServeError> {
    let provider = Arc::new(provider());
    let pem_certs = |pem: &str| -> Result<Vec<CertificateDer<'static>>, ServeError> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ServeError::Tls(e.to_string()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca.cert_pem())? {
        roots.add(c).map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())
        .map_err(|e| ServeError::Tls(format!("the server key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&server.cert_pem)?, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order wins: OpenSSL clients (docker-py, curl) would pick
    // AES-256 first.
    cfg.ignore_client_order = true;
    Ok(cfg)
}

/// The front door's configuration checked and its TLS material ready: the
/// CA, a current server certificate for the host's names, the admin bundle
/// and the acceptor built from them. Made before the engine, so that a bad
/// configuration or CA stops the agent before anything on the host changes.
pub struct Tls {
    acceptor: TlsAcceptor,
    ca: Ca,
}

impl Tls {
    pub fn prepare(cfg: &ServeConfig) -> Result<Tls, ServeError> {
        cfg.validate()?;
        let ca = Ca::load_or_create(&cfg.certs_dir)?;
        let server = ca.ensure_server(&cfg.certs_dir, &host_names(&cfg.san))?;
        ca.ensure_admin(&cfg.certs_dir)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls_config(&ca, &server)?));
        Ok(Tls { acceptor, ca })
    }
}

impl Server {
    /// Binds with TLS material from [`Tls::prepare`] (for `cfg`); serves
    /// nothing until [`Server::run`].
    pub async fn bind(
        cfg: ServeConfig,
        tls: Tls,
        engine: Arc<Engine>,
    ) -> Result<Server, ServeError> {
        let Tls { acceptor, ca } = tls;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process listens there; pick another --listen)"
                } else {
                    ""
                },
                source,
            })?;
        Server::assemble(cfg, engine, listener, acceptor, ca)
    }

    /// Same as [`Server::bind`] on a listener that is already bound (socket
    /// activation).
    pub async fn from_listener(
        mut cfg: ServeConfig,
        tls: Tls,
        engine: Arc<Engine>,
        listener: std::net::TcpListener,
    ) -> Result<Server, ServeError> {
        let Tls { acceptor, ca } = tls;
        let addr = cfg.listen;
        let bind_err = |source| ServeError::Bind {
            addr,
            source,
            hint: "",
        };
        cfg.listen = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(listener).map_err(bind_err)?;
        Server::assemble(cfg, engine, listener, acceptor, ca)
    }

    fn assemble(
        cfg: ServeConfig,
        engine: Arc<Engine>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        ca: Ca,
    ) -> Result<Server, ServeError> {
        let workers = Workers::start(cfg.workers).map_err(ServeError::Workers)?;
        let audit = crate::audit::Audit::new(
            &engine.config().state_dir.join("audit"),
            Duration::from_secs(cfg.audit_retention_secs),
            cfg.audit_max_bytes,
        )
        .map_err(|e| ServeError::Config {
            key: "audit",
            why: e.to_string(),
        })?;
        let jobs = Jobs::new(
            engine,
            Arc::new(ca),
            Duration::from_secs(cfg.default_ttl_secs),
            Duration::from_secs(cfg.max_ttl_secs),
            cfg.warm_pool,
            audit,
            cfg.policy.clone(),
        );
        Ok(Server {
            listener,
            acceptor,
            jobs,
            workers,
            admin_dir: cfg.certs_dir.join("admin"),
            cfg,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.cfg.listen)
    }

    pub fn admin_dir(&self) -> &PathBuf {
        &self.admin_dir
    }

    pub fn jobs(&self) -> Arc<Jobs> {
        self.jobs.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, drains open
    /// connections for a bounded time and tears down every job.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let limits = HttpLimits {
            header_timeout: Duration::from_secs(self.cfg.header_timeout_secs),
            body_idle: Duration::from_secs(self.cfg.body_idle_timeout_secs),
            ..HttpLimits::default()
        };
        let handshake = Duration::from_secs(self.cfg.handshake_timeout_secs);
        let local = self.local_addr();
        tracing::info!(
            listen = %local,
            admin_bundle = %self.admin_dir.display(),
            warm_pool = self.cfg.warm_pool,
            workers = self.workers.threads(),
            "berth serving (mutual TLS)"
        );
        self.jobs.refill_pool();
        // What an earlier agent left goes meanwhile; the listener is bound.
        self.jobs.recover_in_background();
        let mut conns = JoinSet::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let refusals = Arc::new(Refusals::default());
        tokio::pin!(shutdown);
        loop {
            while conns.try_join_next().is_some() {}
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: log, breathe, keep serving.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // The socket moves to a connection thread's own reactor.
            let tcp = match tcp.into_std() {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(client = %peer, error = %e, "cannot hand over a connection");
                    continue;
                }
            };
            let (acceptor, jobs, stop) = (self.acceptor.clone(), self.jobs.clone(), stop.clone());
            let refusals = refusals.clone();
            self.workers.spawn(&mut conns, async move {
                let tcp = match TcpStream::from_std(tcp) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(client = %peer, error = %e, "cannot take over a connection");
                        return;
                    }
                };
                let ends = Ends { stop, refusals };
                // Every line of this connection names its client (and, once
                // the certificate says, its job).
                let span = tracing::info_span!("conn", client = %peer, job = tracing::field::Empty);
                tracing::Instrument::instrument(
                    connection(tcp, peer, local, acceptor, jobs, handshake, limits, ends),
                    span,
                )
                .await
            });
        }
        stop.cancel();
        tracing::info!(open = conns.len(), "shutting down: draining connections");
        let drain = Duration::from_secs(self.cfg.drain_secs);
        if tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!(open = conns.len(), "drain timed out: closing the rest");
            conns.abort_all();
        }
        self.jobs.shutdown().await;
        tracing::info!("berth stopped");
    }
}

/// How a connection may end early: the agent's shutdown, and the shared
/// record of refused peers.
struct Ends {
    stop: tokio_util::sync::CancellationToken,
    refusals: Arc<Refusals>,
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    acceptor: TlsAcceptor,
    jobs: Arc<Jobs>,
    handshake: Duration,
    limits: HttpLimits,
    ends: Ends,
) {
    let Ends { stop, refusals } = ends;
    let counted = jobs.clone();
    let _open = counted.metrics().connection();
    let _ = tcp.set_nodelay(true);
    // A plain HTTP request on the TLS port: say so in one line, serve nothing.
    let mut first = [0u8; 1];
    match tokio::time::timeout(handshake, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
            refused(&refusals, &jobs, Reason::Plaintext, peer, None);
            let mut tcp = tcp;
            let _ = tcp
                .write_all(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                .await;
            let _ = tcp.shutdown().await;
            return;
        }
        Ok(Ok(_)) => {}
        _ => return,
    }
    let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refused(&refusals, &jobs, Reason::Handshake, peer, Some(&e));
            return;
        }
        Err(_) => {
            refused(&refusals, &jobs, Reason::HandshakeTimeout, peer, None);
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Identity::from_cert_der(c.as_ref()));
    match identity {
        Some(Ok(Identity::Admin)) => crate::api::serve(tls, jobs, local, peer, limits, stop).await,
        Some(Ok(Identity::Job(id))) => {
            tracing::Span::current().record("job", id.as_str());
            // Room for a whole write buffer of hyper's, records included:
            // a batch of response bytes leaves in one write.
            let mut tls = tls;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(RELAY_BUFFER + RELAY_BUFFER / 8));
            crate::proxy::serve(tls, jobs, id, peer, limits, stop).await
        }
        Some(Err(e)) => refused(&refusals, &jobs, Reason::BadCertificate, peer, Some(&e)),
        None => refused(&refusals, &jobs, Reason::NoCertificate, peer, None),
    }
}

/// A refused connection: logged (rate-limited) and counted.
fn refused(
    refusals: &Refusals,
    jobs: &Jobs,
    reason: Reason,
    peer: SocketAddr,
    detail: Option<&dyn std::fmt::Display>,
) {
    refusals.refused(reason, peer, detail);
    jobs.metrics().refused(reason.label());
}

/// A listening socket handed over by systemd socket activation
/// (`LISTEN_FDS=1`, `LISTEN_PID` = this process, the socket on fd 3).
pub fn inherited_listener() -> Result<Option<std::net::TcpListener>, String> {
    let Ok(n) = std::env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_us {
        return Ok(None);
    }
    if n.trim() != "1" {
        return Err(format!(
            "LISTEN_FDS={n}: berth takes exactly one socket (berth.socket with one ListenStream)"
        ));
    }
    // The variables stay in our environment; job helpers start with a
    // cleared one, so no child takes them for its own.
    use std::os::fd::FromRawFd;
    let kind = nix::sys::socket::getsockopt(
        // SAFETY: fd 3 is the activation socket by the protocol; borrowed only.
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(3) },
        nix::sys::socket::sockopt::SockType,
    )
    .map_err(|e| format!("LISTEN_FDS: fd 3 is not a socket: {e}"))?;
    if kind != nix::sys::socket::SockType::Stream {
        return Err("LISTEN_FDS: fd 3 is not a stream socket".into());
    }
    // Inherited without close-on-exec: every `ip`, `iptables` or helper the
    // agent starts would hold the listening socket.
    nix::fcntl::fcntl(
        3,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("LISTEN_FDS: cannot mark fd 3 close-on-exec: {e}"))?;
    // SAFETY: fd 3 belongs to this process from here on (protocol above).
    Ok(Some(unsafe { std::net::TcpListener::from_raw_fd(3) }))
}
