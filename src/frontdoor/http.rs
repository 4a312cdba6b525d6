//! What the job API and the proxy share on the HTTP side: the limits that
//! protect the agent from a client, a request body with the client's faults
//! told apart and cut when idle, bounded reads, and the agent's own JSON
//! answers in the shape the Docker clients print.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

/// An answer of the agent's own.
pub type Own = Full<Bytes>;

/// Where a body's bytes are counted (a job request's account).
pub trait Tally: Send + Sync {
    fn to_daemon(&self, bytes: u64);
}

/// Limits that protect the agent from a misbehaving client.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time to receive a complete request head.
    pub header_timeout: Duration,
    /// The largest request head accepted.
    pub max_head: usize,
    /// Longest a request body may send nothing before it is cut.
    pub body_idle: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(30),
            max_head: 64 * 1024,
            body_idle: Duration::from_secs(60),
        }
    }
}

/// What went wrong with a client's request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// It broke the HTTP framing: a bad or overflowing chunk size, a
    /// truncated chunked body, fewer bytes than its Content-Length.
    Malformed(String),
    /// It sent nothing for the body-idle timeout.
    Idle(Duration),
}

impl BodyFault {
    /// The client's fault: a 4xx with what to fix.
    pub fn response(&self) -> Response<Own> {
        match self {
            BodyFault::Malformed(e) => error_response(
                StatusCode::BAD_REQUEST,
                &format!("berth: the request body is malformed: {e}"),
            ),
            BodyFault::Idle(d) => error_response(
                StatusCode::REQUEST_TIMEOUT,
                &format!("berth: the request body sent nothing for {d:?}; request cut"),
            ),
        }
    }
}

/// A client's request body on its way to dockerd: the same frames, with
/// the client's faults told apart from the daemon's (see [`BodyFault`]), and
/// cut when it sends nothing for `idle` (a trickle holds a dockerd
/// connection). The idle clock runs only while the body owes data, not
/// while dockerd is slow to take it.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    fault: Arc<Mutex<Option<BodyFault>>>,
    /// Where the bytes sent on are counted, for a job's request.
    tally: Option<Arc<dyn Tally>>,
}

impl ClientBody {
    pub fn new(
        inner: Incoming,
        idle: Duration,
        tally: Option<Arc<dyn Tally>>,
    ) -> (ClientBody, Arc<Mutex<Option<BodyFault>>>) {
        let fault = Arc::new(Mutex::new(None));
        let body = ClientBody {
            inner,
            idle,
            timer: None,
            fault: fault.clone(),
            tally,
        };
        (body, fault)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                this.timer = None;
                if let (Some(d), Some(t)) = (f.data_ref(), &this.tally) {
                    t.to_daemon(d.len() as u64);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                let fault = BodyFault::Malformed(e.to_string());
                *this.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *this.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(BodyFault::Idle(idle));
                Poll::Ready(Some(Err(format!("request body idle for {idle:?}").into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A JSON error answer in the shape the Docker clients print
/// ("Error response from daemon: <message>").
pub fn error_response(status: StatusCode, message: &str) -> Response<Own> {
    json_response(status, &serde_json::json!({ "message": message }))
}

/// A JSON answer of the agent's own (errors, the job API).
pub fn json_response<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Own> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Why a job API request body was not read.
#[derive(Debug)]
pub enum BodyRefusal {
    TooLarge(usize),
    Client(BodyFault),
}

impl BodyRefusal {
    pub fn response(&self) -> Response<Own> {
        match self {
            BodyRefusal::TooLarge(max) => error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("berth: the request body is over {max} bytes"),
            ),
            BodyRefusal::Client(f) => f.response(),
        }
    }
}

/// Reads a request body up to `max` bytes (job API requests), cut when it
/// sends nothing for `idle`.
pub async fn read_body(body: Incoming, max: usize, idle: Duration) -> Result<Bytes, BodyRefusal> {
    let (body, fault) = ClientBody::new(body, idle, None);
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyRefusal::TooLarge(max)),
        Err(e) => {
            let f = fault.lock().unwrap_or_else(|p| p.into_inner()).take();
            Err(BodyRefusal::Client(
                f.unwrap_or_else(|| BodyFault::Malformed(e.to_string())),
            ))
        }
    }
}

/// Whether a request says its body is JSON (`Content-Type:
/// application/json`, parameters allowed).
pub fn is_json<B>(req: &hyper::Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Serves one connection of the agent's own small requests (the job API,
/// the token exchange) under `limits`; at `stop` the request in flight
/// finishes and keep-alive ends.
pub async fn serve_small<IO, S>(
    io: IO,
    svc: S,
    limits: HttpLimits,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Own>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The same head limit as on a job's connections (431 above it).
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_head)
        .max_buf_size(limits.max_head.max(8192) + 8192)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
