//! Transparent Docker Engine API proxy for one client connection of one job.
//!
//! Requests are parsed by hyper and forwarded, bodies streaming both ways, to
//! the job's private unix socket over one upstream connection (kept alive as
//! long as the client's). Hijacks become raw byte pipes: dockerd's `101
//! UPGRADED` answer to clients that send `Upgrade`, and the older `200` +
//! raw-stream answer to clients that do not (berth asks dockerd for the
//! upgrade on their behalf). Half-close is carried through; when the client
//! goes away, the upstream connection is closed and dockerd cancels the work.

use crate::locks::Lock;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::http::{self, BodyFault, BodyRefusal, ClientBody, HttpLimits, Own, Tally, read_body};
use super::policy::{Denial, Permit, Policy, strip_version};
use crate::jobs::{Jobs, Refusal};

pub type ProxyBody = Either<Relayed, Full<Bytes>>;

/// hyper's read and write buffers on a job's client connection, and the
/// read size on the upstream unix socket: the most response bytes gathered
/// into one TLS write.
pub const RELAY_BUFFER: usize = 256 * 1024;

/// One request's account: how it was decided and answered and what it
/// moved. Counted and audited once, when the last of its parts (the request
/// body, the response body, a hijacked stream) is done with it.
pub struct Account {
    jobs: Arc<Jobs>,
    job: String,
    client: SocketAddr,
    method: String,
    target: String,
    started: std::time::Instant,
    status: std::sync::atomic::AtomicU16,
    to_daemon: std::sync::atomic::AtomicU64,
    to_client: std::sync::atomic::AtomicU64,
    verdict: Mutex<(&'static str, Option<String>)>,
}

impl Account {
    fn new(ctx: &Ctx, method: &hyper::Method, uri: &hyper::Uri) -> Arc<Account> {
        Arc::new(Account {
            jobs: ctx.jobs.clone(),
            job: ctx.job.clone(),
            client: ctx.peer,
            method: method.to_string(),
            target: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            started: std::time::Instant::now(),
            status: Default::default(),
            to_daemon: Default::default(),
            to_client: Default::default(),
            verdict: Mutex::new(("allow", None)),
        })
    }

    fn answered(&self, status: StatusCode) {
        self.status
            .store(status.as_u16(), std::sync::atomic::Ordering::Relaxed);
    }

    fn decided(&self, decision: &'static str, rule: String) {
        *self.verdict.locked() = (decision, Some(rule));
    }

    fn moved(&self, to_daemon: u64, to_client: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.to_daemon.fetch_add(to_daemon, Relaxed);
        self.to_client.fetch_add(to_client, Relaxed);
    }
}

impl Tally for Account {
    fn to_daemon(&self, bytes: u64) {
        self.moved(bytes, 0);
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (status, to_daemon, to_client) = (
            self.status.load(Relaxed),
            self.to_daemon.load(Relaxed),
            self.to_client.load(Relaxed),
        );
        let m = self.jobs.metrics();
        m.request(status);
        m.moved(to_daemon, to_client);
        let (decision, rule) = std::mem::take(&mut *self.verdict.locked());
        let duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::debug!(method = %self.method, path = %self.target, status, to_daemon, to_client, duration_ms, decision, "request served");
        self.jobs.audit().record(crate::audit::Record {
            ts_ms: crate::audit::now_ms(),
            job: std::mem::take(&mut self.job),
            identity: "job".into(),
            client: self.client.to_string(),
            event: "request".into(),
            method: std::mem::take(&mut self.method),
            target: std::mem::take(&mut self.target),
            status,
            bytes_to_daemon: to_daemon,
            bytes_to_client: to_client,
            duration_ms,
            decision: decision.into(),
            rule,
            cpu_ms: None,
            memory_peak_bytes: None,
        });
    }
}

/// An answer of the agent's own, on a job's connection.
fn own(r: Response<Own>) -> Response<ProxyBody> {
    r.map(Either::Right)
}

fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    own(http::error_response(status, message))
}

fn refusal_response(r: &Refusal) -> Response<ProxyBody> {
    let status = match r {
        Refusal::NotReady(_) | Refusal::Unhealthy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Failed { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::FORBIDDEN,
    };
    error_response(status, &r.to_string())
}

/// A request body on its way to dockerd: streamed, or read whole for the
/// policy.
type UpBody = Either<ClientBody, Full<Bytes>>;

type Sender = hyper::client::conn::http1::SendRequest<UpBody>;

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The driver of one upstream connection (hyper's client connection
/// future). It runs on the client connection's own task, polled from two
/// places: the connection loop, and the response body being relayed (see
/// [`Relayed`]). Both are the same task, so the lock is never contended.
#[derive(Clone)]
struct DriverCell(Arc<Mutex<Option<Driver>>>);

impl DriverCell {
    fn new(driver: Driver) -> Self {
        DriverCell(Arc::new(Mutex::new(Some(driver))))
    }

    /// Polls the driver; `Ready` once the upstream connection has ended.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Ok(mut slot) = self.0.try_lock() else {
            // Unreachable (one task polls it); never lose the wake-up.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let Some(driver) = slot.as_mut() else {
            return Poll::Ready(());
        };
        let r = driver.as_mut().poll(cx);
        if r.is_ready() {
            *slot = None;
        }
        r
    }
}

/// A response body relayed from dockerd to the client.
///
/// hyper hands body chunks from the upstream connection to the client's one
/// at a time, and the client side writes out whatever it holds each time
/// the body has nothing more: one TLS write, and one wake-up of the client,
/// per chunk dockerd wrote (32 KiB for `docker save`). When the body has
/// nothing ready, this one lets the upstream connection decode what it has
/// already read, or read more, right away: everything dockerd has sent so
/// far leaves in one write.
pub struct Relayed {
    inner: Incoming,
    upstream: DriverCell,
    /// The request's account (none in unit tests of the relay alone).
    account: Option<Arc<Account>>,
}

impl Relayed {
    fn counted(
        f: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
        account: &Option<Arc<Account>>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let (Poll::Ready(Some(Ok(frame))), Some(a)) = (&f, account)
            && let Some(d) = frame.data_ref()
        {
            a.moved(0, d.len() as u64);
        }
        f
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(f) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Relayed::counted(Poll::Ready(f), &this.account);
        }
        if this.upstream.poll(cx).is_pending() {
            return Relayed::counted(Pin::new(&mut this.inner).poll_frame(cx), &this.account);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream side of one client connection.
struct Upstream {
    /// The kept-alive connection: its sender and its driver.
    conn: Option<(Sender, DriverCell)>,
    /// Drivers of new upstream connections, polled by the client
    /// connection's own task: body bytes then move between the two sockets
    /// without waking another thread, and when the client goes away the
    /// drivers are dropped, so dockerd sees the disconnect and cancels.
    drivers: tokio::sync::mpsc::UnboundedSender<DriverCell>,
}

/// The raw upstream stream of a hijacked request, handed from the request
/// handler to the connection once hyper has written the answer.
type HijackSlot = Arc<Mutex<Option<(hyper::upgrade::Upgraded, Arc<Account>)>>>;

/// Whose connection this is: an authenticated job identity, the registry
/// that routes it and the policy that decides its requests.
pub struct Job {
    pub jobs: Arc<Jobs>,
    pub policy: Arc<Policy>,
    pub job: String,
    pub peer: SocketAddr,
}

struct Ctx {
    jobs: Arc<Jobs>,
    policy: Arc<Policy>,
    job: String,
    peer: SocketAddr,
    upstream: tokio::sync::Mutex<Upstream>,
    hijack: HijackSlot,
    body_idle: Duration,
}

/// Serves one client connection authenticated as a job.
pub async fn serve<IO>(
    io: IO,
    to: Job,
    limits: HttpLimits,
    stop: tokio_util::sync::CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (drivers_tx, mut drivers_rx) = tokio::sync::mpsc::unbounded_channel::<DriverCell>();
    let Job {
        jobs,
        policy,
        job,
        peer,
    } = to;
    let ctx = Arc::new(Ctx {
        jobs,
        policy,
        job,
        peer,
        upstream: tokio::sync::Mutex::new(Upstream {
            conn: None,
            drivers: drivers_tx,
        }),
        hijack: Arc::new(Mutex::new(None)),
        body_idle: limits.body_idle,
    });
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        Box::pin(async move { Ok::<_, Infallible>(handle(&ctx, req).await) })
            as Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>
    });
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_head)
        .max_buf_size(RELAY_BUFFER)
        .serve_connection(TokioIo::new(io), svc);
    let mut drivers: Vec<DriverCell> = Vec::new();
    let mut stopping = false;
    let done = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            Some(d) = drivers_rx.recv() => drivers.push(d),
            // Never completes: drives the upstream connections, forgetting
            // those that have ended.
            () = std::future::poll_fn(|cx| {
                drivers.retain(|d| d.poll(cx).is_pending());
                Poll::<()>::Pending
            }) => {}
            // Agent shutdown: finish the request in flight, take no more.
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    drop(drivers);
    if let Err(e) = done {
        tracing::debug!(job = %ctx.job, client = %ctx.peer, error = %e, "client connection ended");
        return;
    }
    let parts = conn.into_parts();
    let upgraded = ctx.hijack.locked().take();
    let mut client = parts.io.into_inner();
    match upgraded {
        Some((up, account)) => {
            let mut up = TokioIo::new(up);
            // Bytes the client sent right after the request head (stdin).
            if !parts.read_buf.is_empty() && up.write_all(&parts.read_buf).await.is_err() {
                return;
            }
            // Each direction ends on its own: EOF from the client (close_notify
            // or FIN) shuts the write side towards dockerd (stdin EOF) while
            // output keeps flowing back, and the other way round.
            match tokio::io::copy_bidirectional(&mut client, &mut up).await {
                Ok((to_daemon, to_client)) => {
                    account.moved(to_daemon + parts.read_buf.len() as u64, to_client);
                    tracing::debug!(job = %ctx.job, to_daemon, to_client, "hijacked stream closed")
                }
                Err(e) => tracing::debug!(job = %ctx.job, error = %e, "hijacked stream broke"),
            }
        }
        None => {
            let _ = client.shutdown().await;
        }
    }
}

/// Endpoints on which dockerd hijacks the connection.
fn is_hijack(method: &hyper::Method, path: &str) -> bool {
    if method != hyper::Method::POST {
        return false;
    }
    let p = strip_version(path);
    let seg: Vec<&str> = p.trim_matches('/').split('/').collect();
    matches!(
        seg.as_slice(),
        ["containers", _, "attach"] | ["exec", _, "start"] | ["session"] | ["grpc"]
    )
}

/// The one path of the job API a job's own certificate opens:
/// `DELETE /berth/v1/job?outcome=success|failure` ends that job, saying how
/// it ended. A token's job has no admin to end it; its rule decided, when
/// the job was made, whether it may commit to a project cache at all.
pub const OWN_END: &str = "/berth/v1/job";

async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path() == OWN_END {
        return end_own_job(ctx, &req).await;
    }
    let (parts, body) = req.into_parts();
    let account = Account::new(ctx, &parts.method, &parts.uri);
    let resp = answer(ctx, parts, body, &account).await;
    account.answered(resp.status());
    resp
}

/// Ends the job whose certificate asked, once it is gone (a commit to
/// its project cache included). Audited before it starts: the job's audit
/// file closes with its end.
async fn end_own_job(ctx: &Ctx, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != hyper::Method::DELETE {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "berth: DELETE /berth/v1/job?outcome=success|failure ends this job",
        );
    }
    let outcome = match super::api::outcome_of(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, &why),
    };
    if let Err(r) = ctx.jobs.route(&ctx.job) {
        return refusal_response(&r);
    }
    let mut rec =
        crate::audit::Record::event(&ctx.job, "job", &ctx.peer.to_string(), "end-requested", 0);
    rec.method = "DELETE".into();
    rec.target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    ctx.jobs.audit().record(rec);
    tracing::info!(job = %ctx.job, client = %ctx.peer, ?outcome, "the job ends itself");
    match ctx.jobs.delete_with(&ctx.job, outcome).await {
        Ok(()) => {
            let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("berth: {e}")),
    }
}

async fn answer(
    ctx: &Ctx,
    parts: hyper::http::request::Parts,
    body: Incoming,
    account: &Arc<Account>,
) -> Response<ProxyBody> {
    let deny = |d: Denial| {
        tracing::warn!(job = %ctx.job, client = %ctx.peer, method = %parts.method, path = %parts.uri.path(), rule = d.rule, "request denied");
        ctx.jobs.metrics().denied(d.rule);
        account.decided("deny", d.rule.into());
        error_response(d.status, &d.message)
    };
    // A body the policy must read is read whole (bounded) and sent on as
    // read; any other streams through.
    let policy = &ctx.policy;
    if policy.needs_body(&parts.method, parts.uri.path()) {
        let bytes = match read_body(body, policy.max_body_bytes, ctx.body_idle).await {
            Ok(b) => b,
            Err(BodyRefusal::TooLarge(max)) => {
                return deny(Denial {
                    rule: "body-too-large",
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!(
                        "berth: denied by this agent's policy: the request body is over {max} bytes (policy.max_body_bytes)"
                    )
                    .into(),
                });
            }
            Err(r) => return own(r.response()),
        };
        match policy.decide(&parts.method, &parts.uri, &parts.headers, Some(&bytes)) {
            Ok(permit) => {
                account.moved(bytes.len() as u64, 0);
                forward(
                    ctx,
                    permit,
                    parts,
                    Either::Right(Full::new(bytes)),
                    None,
                    account,
                )
                .await
            }
            Err(d) => deny(d),
        }
    } else {
        match policy.decide(&parts.method, &parts.uri, &parts.headers, None) {
            Ok(permit) => {
                let tally: Arc<dyn Tally> = account.clone();
                let (b, fault) = ClientBody::new(body, ctx.body_idle, Some(tally));
                forward(ctx, permit, parts, Either::Left(b), Some(fault), account).await
            }
            Err(d) => deny(d),
        }
    }
}

/// Sends a permitted request to the job's dockerd and its answer back (a
/// hijack becomes a raw stream after the head).
async fn forward(
    ctx: &Ctx,
    _permit: Permit,
    parts: hyper::http::request::Parts,
    body: UpBody,
    fault: Option<Arc<Mutex<Option<BodyFault>>>>,
    account: &Arc<Account>,
) -> Response<ProxyBody> {
    let (method, path) = (parts.method.clone(), parts.uri.path().to_string());
    let mut req = Request::from_parts(parts, body);
    let socket = match ctx.jobs.route(&ctx.job) {
        Ok(s) => s,
        Err(r) => {
            tracing::warn!(job = %ctx.job, client = %ctx.peer, %method, %path, refusal = %r, "request refused");
            account.decided("refused", r.kind().into());
            return refusal_response(&r);
        }
    };
    let client_upgrade = req.headers().contains_key(UPGRADE);
    let hijack = client_upgrade || is_hijack(&method, &path);
    if hijack && !client_upgrade {
        // Ask dockerd for a proper upgrade; the client gets the raw-stream
        // answer it expects.
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        req.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("tcp"));
    }
    let mut up = ctx.upstream.lock().await;
    let (sender, driver) = match ready_sender(&mut up, &socket).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(job = %ctx.job, error = %e, "cannot reach the job's dockerd");
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("berth: cannot reach the daemon of job {}: {e}", ctx.job),
            );
        }
    };
    let upstream = driver.clone();
    // A daemon that stops answering (hung, stopped, gone) ends the wait
    // with the job's refusal instead of leaving the client hanging.
    let answer = tokio::select! {
        r = sender.send_request(req) => r,
        refusal = ctx.jobs.unserved(&ctx.job) => {
            up.conn = None;
            tracing::warn!(job = %ctx.job, client = %ctx.peer, %method, %path, %refusal, "request cut: the job's dockerd stopped answering");
            account.decided("refused", refusal.kind().into());
            return refusal_response(&refusal);
        }
    };
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            up.conn = None;
            let fault = fault.and_then(|f| f.locked().take());
            if let Some(fault) = fault {
                tracing::info!(job = %ctx.job, client = %ctx.peer, %method, %path, ?fault, "client's request body refused");
                return own(fault.response());
            }
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "berth: the daemon of job {} broke the request: {e}",
                    ctx.job
                ),
            );
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp.map(|inner| {
            Either::Left(Relayed {
                inner,
                upstream,
                account: Some(account.clone()),
            })
        });
    }
    // Hijacked: this upstream connection now belongs to the raw stream.
    up.conn = None;
    let headers = resp.headers().clone();
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "berth: upgrade with the daemon of job {} failed: {e}",
                    ctx.job
                ),
            );
        }
    };
    *ctx.hijack.locked() = Some((upgraded, account.clone()));
    if client_upgrade {
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *r.headers_mut() = headers;
        r
    } else {
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        r.headers_mut().insert(
            CONTENT_TYPE,
            headers
                .get(CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static(
                    "application/vnd.docker.raw-stream",
                )),
        );
        // Ends hyper's part of the connection after the head; the raw stream
        // follows on the same connection.
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

async fn ready_sender<'a>(
    up: &'a mut Upstream,
    socket: &PathBuf,
) -> std::io::Result<&'a mut (Sender, DriverCell)> {
    let alive = match &mut up.conn {
        Some((s, _)) => !s.is_closed() && s.ready().await.is_ok(),
        None => false,
    };
    if !alive {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        // Large reads from dockerd: one read takes all it has written
        // (its socket buffer holds about 208 KiB), and [`Relayed`] sends it
        // on in one TLS write.
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .read_buf_exact_size(Some(RELAY_BUFFER))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let driver = DriverCell::new(Box::pin(async move {
            let _ = conn.with_upgrades().await;
        }));
        let _ = up.drivers.send(driver.clone());
        up.conn = Some((sender, driver));
    }
    up.conn
        .as_mut()
        .ok_or_else(|| std::io::Error::other("no upstream connection"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::Method;

    #[test]
    fn hijack_endpoints() {
        assert!(is_hijack(&Method::POST, "/v1.41/containers/abc/attach"));
        assert!(is_hijack(&Method::POST, "/exec/abc/start"));
        assert!(is_hijack(&Method::POST, "/v1.41/session"));
        assert!(!is_hijack(&Method::GET, "/containers/abc/attach"));
        assert!(!is_hijack(&Method::POST, "/containers/abc/start"));
        assert!(!is_hijack(&Method::POST, "/containers/create"));
    }

    /// An in-memory client-side stream that counts the writes reaching it.
    struct Counted {
        io: tokio::io::DuplexStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    const CHUNKS: u8 = 8;

    /// Relays one response of eight 32 KiB chunks, which "dockerd" writes
    /// at once, to a client; returns the writes on the client side and the
    /// body the client got.
    async fn relay(inline: bool) -> (usize, Bytes) {
        use tokio::io::AsyncReadExt;
        let (up_client, mut daemon) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut head = vec![0u8; 4096];
            let _ = daemon.read(&mut head).await;
            let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for i in 0..CHUNKS {
                resp.extend_from_slice(b"8000\r\n");
                resp.extend(std::iter::repeat_n(b'a' + i, 32 * 1024));
                resp.extend_from_slice(b"\r\n");
            }
            resp.extend_from_slice(b"0\r\n\r\n");
            daemon.write_all(&resp).await.unwrap();
            let _ = daemon.read(&mut head).await;
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up_client))
            .await
            .unwrap();
        let driver = DriverCell::new(Box::pin(async move {
            let _ = conn.await;
        }));
        // The connection loop's share of driving it, as in `serve`.
        let looped = driver.clone();
        tokio::spawn(std::future::poll_fn(move |cx| looped.poll(cx)));
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (sender, driver) = (sender.clone(), driver.clone());
            async move {
                let resp = sender.lock().await.send_request(req).await?;
                Ok::<_, hyper::Error>(resp.map(|inner| match inline {
                    true => Either::Left(Relayed {
                        inner,
                        upstream: driver,
                        account: None,
                    }),
                    false => Either::Right(inner),
                }))
            }
        });
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Counted {
            io: server_io,
            writes: writes.clone(),
        };
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .max_buf_size(RELAY_BUFFER)
                .serve_connection(TokioIo::new(counted), svc),
        );
        let (mut client, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = client
            .send_request(
                Request::get("/images/big/get")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (writes.load(std::sync::atomic::Ordering::Relaxed), body)
    }

    #[test]
    fn relayed_body_leaves_in_few_writes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let expected: Vec<u8> = (0..CHUNKS)
            .flat_map(|i| std::iter::repeat_n(b'a' + i, 32 * 1024))
            .collect();
        // Handed over one chunk at a time, each chunk is its own write.
        let (per_chunk, body) = rt.block_on(relay(false));
        assert_eq!(body, expected);
        assert!(per_chunk >= CHUNKS as usize, "{per_chunk} writes");
        // Driven inline, what dockerd wrote at once leaves at once (the
        // write buffer holds 256 KiB: two writes at most).
        let (batched, body) = rt.block_on(relay(true));
        assert_eq!(body, expected);
        assert!(batched <= 2, "{batched} writes");
    }

    #[test]
    fn version_prefix() {
        assert_eq!(strip_version("/v1.41/info"), "/info");
        assert_eq!(strip_version("/info"), "/info");
        assert_eq!(strip_version("/volumes"), "/volumes");
        assert_eq!(strip_version("/v1.41"), "/v1.41");
    }
}
