//! The token exchange: `POST /berth/v1/token` on a listener of its own,
//! TLS with server authentication only (the front door's port keeps
//! refusing every handshake without a client certificate). A CI job sends
//! its platform's OIDC token and gets a job bundle, exactly as `job create`
//! answers; what it may get is the agent's rules' (see [`crate::oidc`]).
//! Every exchange, granted or refused, is audited in the `tokens` stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::api;
use super::http::{HttpLimits, Own, error_response, is_json, read_body, serve_small};
use super::refusals::{Reason, Refusals};
use crate::audit::{Record, TOKENS};
use crate::backoff::Backoff;
use crate::jobs::{CacheCommit, CreateJob, Jobs};
use crate::oidc::{TokenError, Verifier};

/// A token request: the JWT, and optionally a shorter job than the rule
/// grants.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Exchange {
    token: String,
    #[serde(default, with = "crate::duration::text::option")]
    ttl: Option<Duration>,
    /// Workspaces the job asks for: each must match a pattern of the rule.
    #[serde(default)]
    workspaces: Vec<crate::sandbox::WorkspaceRequest>,
    /// When the job commits to the rule's project cache, if the rule lets
    /// it write (on-success by default).
    #[serde(default)]
    cache_commit: Option<CacheCommit>,
    /// Whether the job runs foreign binaries through the host's emulators
    /// (the agent's choice when absent).
    #[serde(default)]
    emulation: Option<bool>,
}

/// JWTs are a few KiB; nothing else is read.
const MAX_BODY: usize = 16 * 1024;

/// Exchanges served at once; a flood waits in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;

pub struct TokenDoor {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    verifier: Arc<Verifier>,
    jobs: Arc<Jobs>,
    /// The front door's port: the endpoint a new job is given.
    front_port: u16,
    handshake: Duration,
    limits: HttpLimits,
    /// Anyone can send tokens: refusals are logged at a bounded rate.
    refusals: Refusals,
}

impl TokenDoor {
    pub fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        verifier: Verifier,
        jobs: Arc<Jobs>,
        front_port: u16,
        handshake: Duration,
        limits: HttpLimits,
    ) -> TokenDoor {
        TokenDoor {
            listener,
            acceptor,
            verifier: Arc::new(verifier),
            jobs,
            front_port,
            handshake,
            limits,
            refusals: Refusals::default(),
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop`; connections in flight finish their request.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        self.verifier.refresh().await;
        let me = Arc::new(self);
        let mut conns = JoinSet::new();
        let mut backoff = Backoff::new();
        loop {
            while conns.try_join_next().is_some() {}
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                r = me.listener.accept(), if conns.len() < MAX_CONNECTIONS => r,
                Some(_) = conns.join_next(), if conns.len() >= MAX_CONNECTIONS => continue,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => {
                    backoff.reset();
                    x
                }
                Err(e) => {
                    tracing::error!(error = %e, "token listener: accept failed");
                    backoff.wait().await;
                    continue;
                }
            };
            let (me, stop) = (me.clone(), stop.clone());
            conns.spawn(async move { me.connection(tcp, peer, stop).await });
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let local = tcp
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let tls = match tokio::time::timeout(self.handshake, self.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "token listener: handshake failed");
                return;
            }
            Err(_) => return,
        };
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req, local, peer).await) }
        });
        if let Err(e) = serve_small(tls, svc, self.limits, stop).await {
            tracing::debug!(client = %peer, error = %e, "token connection ended");
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Response<Own> {
        if req.uri().path() != "/berth/v1/token" {
            return error_response(
                StatusCode::NOT_FOUND,
                "berth: this listener serves POST /berth/v1/token only",
            );
        }
        if req.method() != Method::POST {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "berth: POST /berth/v1/token {\"token\": \"<JWT>\"}",
            );
        }
        if !is_json(&req) {
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "berth: POST /berth/v1/token takes Content-Type: application/json",
            );
        }
        let host = api::endpoint_host(&req, local);
        let body = match read_body(req.into_body(), MAX_BODY, self.limits.body_idle).await {
            Ok(b) => b,
            Err(r) => return r.response(),
        };
        let ask: Exchange = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "berth: invalid token request (expected {{\"token\": \"<JWT>\", \"ttl\": \"30m\"}}): {e}"
                    ),
                );
            }
        };
        let verified = match self.verifier.verify(&ask.token).await {
            Ok(v) => v,
            Err(e) => return self.refuse(&e, peer),
        };
        let g = &verified.grant;
        let max = g
            .max_ttl
            .unwrap_or(self.jobs.max_ttl)
            .min(self.jobs.max_ttl);
        let ttl = ask.ttl.unwrap_or(self.jobs.default_ttl.min(max));
        if ttl > max {
            return self.deny(
                peer,
                StatusCode::BAD_REQUEST,
                "token-ttl",
                &format!("rule={} sub={}", g.rule, g.subject),
                &format!(
                    "berth: ttl {} is above what rule {} grants ({})",
                    crate::duration::format(ttl),
                    g.rule,
                    crate::duration::format(max)
                ),
            );
        }
        if let Some(w) = ask.workspaces.iter().find(|w| !g.allows_workspace(&w.path)) {
            let path = w.path.display();
            return self.deny(
                peer,
                StatusCode::FORBIDDEN,
                "token-workspace",
                &format!("rule={} sub={} workspace={path}", g.rule, g.subject),
                &format!(
                    "berth: workspace {path} is not one that rule {} grants",
                    g.rule
                ),
            );
        }
        // The rule names the key; a token asks only when its job commits,
        // and only a rule that lets it write grants a commit.
        let (cache_key, cache_commit, cache_from) = match (&g.cache, ask.cache_commit) {
            (Some(c), commit) if c.write => (Some(c.key.clone()), commit, None),
            (Some(c), None | Some(CacheCommit::Never)) => (None, None, Some(c.key.clone())),
            (None, None | Some(CacheCommit::Never)) => (None, None, None),
            (granted, Some(_)) => {
                let why = match granted {
                    Some(c) => format!(
                        "rule {} lets its jobs read project cache {:?}, never commit to it",
                        g.rule,
                        c.key.as_str()
                    ),
                    None => format!("rule {} grants no project cache", g.rule),
                };
                return self.deny(
                    peer,
                    StatusCode::FORBIDDEN,
                    "token-cache-commit",
                    &format!("rule={} sub={}", g.rule, g.subject),
                    &format!("berth: {why}"),
                );
            }
        };
        if let Err(e) = self.verifier.spend(&verified) {
            return self.refuse(&e, peer);
        }
        let spec = CreateJob {
            ttl: Some(ttl),
            limits: g.limits.clone(),
            labels: g.labels.clone(),
            workspaces: ask.workspaces,
            cache_key,
            cache_commit,
            cache_from,
            emulation: ask.emulation,
        };
        match self.jobs.create(spec).await {
            Ok((view, bundle)) => {
                let who = format!("rule={} sub={} iss={}", g.rule, g.subject, g.issuer);
                tracing::info!(job = %view.id, client = %peer, rule = %g.rule, subject = %g.subject, "job granted for a token");
                self.audit(
                    peer,
                    201,
                    "allow",
                    &g.rule,
                    &format!("job={} {who}", view.id),
                );
                let mut rec = Record::event(&view.id, "token", &peer.to_string(), "created", 201);
                rec.target = who;
                self.jobs.audit().record(rec);
                api::created(view, bundle, &host, self.front_port)
            }
            Err(e) => {
                // The token bought nothing: it may be tried again.
                self.verifier.unspend(&verified);
                api::create_failed(&e)
            }
        }
    }

    fn refuse(&self, e: &TokenError, peer: SocketAddr) -> Response<Own> {
        self.refusals.refused(Reason::Token, peer, Some(&e));
        self.jobs.metrics().denied(e.kind());
        self.audit(peer, e.status(), "deny", e.kind(), &e.to_string());
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        error_response(status, &format!("berth: {e}"))
    }

    /// A request its verified token's rule does not grant: audited (`what`
    /// names the rule and subject) and answered with `status`, `message`.
    fn deny(
        &self,
        peer: SocketAddr,
        status: StatusCode,
        rule: &str,
        what: &str,
        message: &str,
    ) -> Response<Own> {
        self.audit(peer, status.as_u16(), "deny", rule, what);
        error_response(status, message)
    }

    fn audit(&self, peer: SocketAddr, status: u16, decision: &str, rule: &str, what: &str) {
        let mut rec = Record::event(TOKENS, "token", &peer.to_string(), "token", status);
        rec.method = "POST".into();
        rec.target = what.into();
        rec.decision = decision.into();
        rec.rule = Some(rule.into());
        self.jobs.audit().record(rec);
    }
}
