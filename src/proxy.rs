//! Transparent Docker Engine API proxy for one client connection of one job.
//!
//! Requests are parsed by hyper and forwarded, bodies streaming both ways, to
//! the job's private unix socket over one upstream connection (kept alive as
//! long as the client's). Hijacks become raw byte pipes: dockerd's `101
//! UPGRADED` answer to clients that send `Upgrade`, and the older `200` +
//! raw-stream answer to clients that do not (berth asks dockerd for the
//! upgrade on their behalf). Half-close is carried through; when the client
//! goes away, the upstream connection is closed and dockerd cancels the work.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::jobs::{Jobs, Refusal};
use crate::policy::{self, Decision};

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Read size on the upstream unix socket.
const UPSTREAM_READ: usize = 256 * 1024;

/// Limits that protect the agent from a misbehaving client.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time to receive a complete request head.
    pub header_timeout: Duration,
    /// Read buffer, and so the largest request head accepted.
    pub max_head: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(30),
            max_head: 64 * 1024,
        }
    }
}

/// A JSON error answer in the shape the Docker clients print
/// ("Error response from daemon: <message>").
pub fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json_response(status, &serde_json::json!({ "message": message }))
}

/// A JSON answer of the agent's own (errors, the job API).
pub fn json_response<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<ProxyBody> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn refusal_response(r: &Refusal) -> Response<ProxyBody> {
    let status = match r {
        Refusal::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Failed { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::FORBIDDEN,
    };
    error_response(status, &r.to_string())
}

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The upstream side of one client connection.
struct Upstream {
    sender: Option<Sender>,
    /// Drivers of new upstream connections, polled by the client
    /// connection's own task: body bytes then move between the two sockets
    /// without waking another thread, and when the client goes away the
    /// drivers are dropped, so dockerd sees the disconnect and cancels.
    drivers: tokio::sync::mpsc::UnboundedSender<Driver>,
}

/// The raw upstream stream of a hijacked request, handed from the request
/// handler to the connection once hyper has written the answer.
type HijackSlot = Arc<Mutex<Option<hyper::upgrade::Upgraded>>>;

struct Ctx {
    jobs: Arc<Jobs>,
    job: String,
    peer: SocketAddr,
    upstream: tokio::sync::Mutex<Upstream>,
    hijack: HijackSlot,
}

/// Serves one client connection authenticated as job `job`.
pub async fn serve<IO>(
    io: IO,
    jobs: Arc<Jobs>,
    job: String,
    peer: SocketAddr,
    limits: HttpLimits,
    stop: tokio_util::sync::CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (drivers_tx, mut drivers_rx) = tokio::sync::mpsc::unbounded_channel::<Driver>();
    let ctx = Arc::new(Ctx {
        jobs,
        job,
        peer,
        upstream: tokio::sync::Mutex::new(Upstream {
            sender: None,
            drivers: drivers_tx,
        }),
        hijack: Arc::new(Mutex::new(None)),
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
        .max_buf_size(limits.max_head.max(8192))
        .serve_connection(TokioIo::new(io), svc);
    let mut drivers = futures_util::stream::FuturesUnordered::new();
    let mut stopping = false;
    let done = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            Some(d) = drivers_rx.recv() => drivers.push(d),
            Some(()) = futures_util::StreamExt::next(&mut drivers), if !drivers.is_empty() => {}
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
    let upgraded = ctx.hijack.lock().unwrap().take();
    let mut client = parts.io.into_inner();
    match upgraded {
        Some(up) => {
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

/// "/v1.41/containers/json" → "/containers/json".
pub fn strip_version(path: &str) -> &str {
    if let Some(rest) = path.strip_prefix("/v")
        && let Some(i) = rest.find('/')
        && rest[..i].chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        return &rest[i..];
    }
    path
}

async fn handle(ctx: &Ctx, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if let Decision::Deny {
        rule,
        status,
        message,
    } = policy::decide_job(&method, &path)
    {
        tracing::warn!(job = %ctx.job, client = %ctx.peer, %method, %path, rule, "request denied");
        return error_response(status, message);
    }
    let socket = match ctx.jobs.route(&ctx.job) {
        Ok(s) => s,
        Err(r) => {
            tracing::warn!(job = %ctx.job, client = %ctx.peer, %method, %path, refusal = %r, "request refused");
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
    let sender = match ready_sender(&mut up, &socket).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(job = %ctx.job, error = %e, "cannot reach the job's dockerd");
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("berth: cannot reach the daemon of job {}: {e}", ctx.job),
            );
        }
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            up.sender = None;
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
        return resp.map(Either::Left);
    }
    // Hijacked: this upstream connection now belongs to the raw stream.
    up.sender = None;
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
    *ctx.hijack.lock().unwrap() = Some(upgraded);
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
) -> std::io::Result<&'a mut Sender> {
    let alive = match &mut up.sender {
        Some(s) => !s.is_closed() && s.ready().await.is_ok(),
        None => false,
    };
    if !alive {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        // Large reads from dockerd: fewer, bigger body frames cross from the
        // upstream task to the client's (image save/load, logs, cp).
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .read_buf_exact_size(Some(UPSTREAM_READ))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let _ = up.drivers.send(Box::pin(async move {
            let _ = conn.with_upgrades().await;
        }));
        up.sender = Some(sender);
    }
    up.sender
        .as_mut()
        .ok_or_else(|| std::io::Error::other("no upstream connection"))
}

/// Reads a request body up to `max` bytes (job API requests).
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, StatusCode> {
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn version_prefix() {
        assert_eq!(strip_version("/v1.41/info"), "/info");
        assert_eq!(strip_version("/info"), "/info");
        assert_eq!(strip_version("/volumes"), "/volumes");
        assert_eq!(strip_version("/v1.41"), "/v1.41");
    }
}
