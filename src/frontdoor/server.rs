//! The listener: one TCP port (2376 by default) for every job. It accepts,
//! hands each connection to a connection thread, refuses a plain HTTP
//! request in one line (there is no plaintext listener), bounds the TLS
//! handshake in time, and passes the identity to the router. At shutdown
//! it stops accepting, drains open connections for a bounded time and ends
//! every job.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::config::{ServeConfig, ServeError};
use super::http::HttpLimits;
use super::policy::Policy;
use super::refusals::{Reason, Refusals};
use super::router::{self, Reach};
use super::tls::{self, Tls};
use super::token::TokenDoor;
use super::workers::Workers;
use crate::jobs::Jobs;
use crate::sandbox::Engine;

/// A bound, ready front door.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    jobs: Arc<Jobs>,
    policy: Arc<Policy>,
    workers: Workers,
    cfg: ServeConfig,
    admin_dir: PathBuf,
    /// The token exchange's own listener, when `[token]` enables it.
    token: Option<TokenDoor>,
}

fn bind_error(addr: SocketAddr, source: std::io::Error, flag: &'static str) -> ServeError {
    ServeError::Bind {
        addr,
        hint: if source.kind() == std::io::ErrorKind::AddrInUse {
            flag
        } else {
            ""
        },
        source,
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
        let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
            bind_error(
                cfg.listen,
                e,
                " (another process listens there; pick another --listen)",
            )
        })?;
        Server::assemble(cfg, engine, listener, tls).await
    }

    /// Same as [`Server::bind`] on a listener that is already bound (socket
    /// activation).
    pub async fn from_listener(
        mut cfg: ServeConfig,
        tls: Tls,
        engine: Arc<Engine>,
        listener: std::net::TcpListener,
    ) -> Result<Server, ServeError> {
        let addr = cfg.listen;
        let bind_err = |source| ServeError::Bind {
            addr,
            source,
            hint: "",
        };
        cfg.listen = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(listener).map_err(bind_err)?;
        Server::assemble(cfg, engine, listener, tls).await
    }

    async fn assemble(
        cfg: ServeConfig,
        engine: Arc<Engine>,
        listener: TcpListener,
        tls: Tls,
    ) -> Result<Server, ServeError> {
        let Tls {
            acceptor,
            ca,
            token,
        } = tls;
        // Bound before anything else starts: a taken port fails the start.
        let token = match token {
            Some((acceptor, verifier)) => {
                let listener = TcpListener::bind(cfg.token.listen).await.map_err(|e| {
                    bind_error(
                        cfg.token.listen,
                        e,
                        " (another process listens there; pick another token.listen)",
                    )
                })?;
                Some((listener, acceptor, verifier))
            }
            None => None,
        };
        let workers = Workers::start(cfg.workers).map_err(ServeError::Workers)?;
        let audit = crate::audit::Audit::new(
            &engine.config().state_dir.join("audit"),
            cfg.audit_retention,
            cfg.audit_max_bytes,
        )
        .map_err(|e| ServeError::Config {
            key: "audit",
            why: e.to_string(),
        })?;
        let jobs = Jobs::new(
            engine,
            Arc::new(ca),
            cfg.default_ttl,
            cfg.max_ttl,
            cfg.warm_pool,
            audit,
        );
        let limits = http_limits(&cfg);
        let front_port = listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.listen.port());
        let token = token.map(|(listener, acceptor, verifier)| {
            TokenDoor::new(
                listener,
                acceptor,
                verifier,
                jobs.clone(),
                front_port,
                cfg.handshake_timeout,
                limits,
            )
        });
        Ok(Server {
            token,
            listener,
            acceptor,
            jobs,
            policy: Arc::new(cfg.policy.clone()),
            workers,
            admin_dir: cfg.certs_dir.join("admin"),
            cfg,
        })
    }

    /// The token listener's address, when it is enabled.
    pub fn token_addr(&self) -> Option<SocketAddr> {
        self.token.as_ref().and_then(TokenDoor::local_addr)
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
        let limits = http_limits(&self.cfg);
        let handshake = self.cfg.handshake_timeout;
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
        let token = match self.token {
            Some(t) => {
                tracing::info!(listen = ?t.local_addr(), "token exchange serving (TLS, server authentication)");
                Some(tokio::spawn(t.run(stop.clone())))
            }
            None => None,
        };
        let door = Arc::new(Door {
            acceptor: self.acceptor.clone(),
            handshake,
            refusals: Refusals::default(),
            reach: Reach {
                jobs: self.jobs.clone(),
                policy: self.policy.clone(),
                local,
                limits,
                stop: stop.clone(),
            },
        });
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
            let door = door.clone();
            self.workers.spawn(&mut conns, async move {
                let tcp = match TcpStream::from_std(tcp) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(client = %peer, error = %e, "cannot take over a connection");
                        return;
                    }
                };
                // Every line of this connection names its client (and, once
                // the certificate says, its job).
                let span = tracing::info_span!("conn", client = %peer, job = tracing::field::Empty);
                tracing::Instrument::instrument(
                    connection(tcp, peer, door),
                    span,
                )
                .await
            });
        }
        stop.cancel();
        tracing::info!(open = conns.len(), "shutting down: draining connections");
        let drain = self.cfg.drain;
        if tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!(open = conns.len(), "drain timed out: closing the rest");
            conns.abort_all();
        }
        if let Some(t) = token {
            let _ = t.await;
        }
        self.jobs.shutdown().await;
        tracing::info!("berth stopped");
    }
}

fn http_limits(cfg: &ServeConfig) -> HttpLimits {
    HttpLimits {
        header_timeout: cfg.header_timeout,
        body_idle: cfg.body_idle_timeout,
        ..HttpLimits::default()
    }
}

/// What every connection of one front door shares.
struct Door {
    acceptor: TlsAcceptor,
    handshake: Duration,
    /// Refused peers, logged at a bounded rate.
    refusals: Refusals,
    reach: Reach,
}

async fn connection(tcp: TcpStream, peer: SocketAddr, door: Arc<Door>) {
    let (jobs, refusals, handshake) = (&door.reach.jobs, &door.refusals, door.handshake);
    let _open = jobs.metrics().connection();
    let _ = tcp.set_nodelay(true);
    // A plain HTTP request on the TLS port: say so in one line, serve nothing.
    let mut first = [0u8; 1];
    match tokio::time::timeout(handshake, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
            refused(refusals, jobs, Reason::Plaintext, peer, None);
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
    let tls = match tokio::time::timeout(handshake, door.acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refused(refusals, jobs, Reason::Handshake, peer, Some(&e));
            return;
        }
        Err(_) => {
            refused(refusals, jobs, Reason::HandshakeTimeout, peer, None);
            return;
        }
    };
    match tls::identity(&tls) {
        Some(Ok(identity)) => router::route(tls, identity, peer, &door.reach).await,
        Some(Err(e)) => refused(refusals, jobs, Reason::BadCertificate, peer, Some(&e)),
        None => refused(refusals, jobs, Reason::NoCertificate, peer, None),
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
