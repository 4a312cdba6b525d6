//! The job API on the front door, for the admin identity:
//! `POST /berth/v1/jobs`, `GET /berth/v1/jobs`, `GET|DELETE /berth/v1/jobs/{id}`,
//! `GET /berth/v1/jobs/{id}/audit` (its requests, as JSON lines, kept after
//! it ends), `GET /berth/v1/pool` (the warm pool, and why it is short),
//! `GET /berth/v1/capacity` (whether it takes another job),
//! `GET /berth/v1/metrics` (Prometheus text).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use super::http::{
    HttpLimits, Own, error_response, is_json, json_response, read_body, serve_small,
};
use super::policy::{self, Denial};
use crate::jobs::{CreateJob, JobError, JobView, Jobs, Outcome};
use crate::pki::valid_job_id;

const MAX_BODY: usize = 64 * 1024;

/// What `POST /berth/v1/jobs` answers.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Created {
    pub id: String,
    /// `tcp://HOST:PORT` for DOCKER_HOST.
    pub endpoint: String,
    /// The job's own address on the agent's host: ports the job publishes
    /// answer there.
    pub address: String,
    /// The agent's host ports forwarded to the job; what it publishes
    /// without a fixed host port answers at the endpoint's host too.
    #[serde(default)]
    pub ports: Option<crate::sandbox::PortRange>,
    pub expires_at: u64,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

pub async fn serve<IO>(
    io: IO,
    jobs: Arc<Jobs>,
    local: SocketAddr,
    peer: SocketAddr,
    limits: HttpLimits,
    stop: tokio_util::sync::CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let jobs = jobs.clone();
        async move { Ok::<_, Infallible>(handle(&jobs, req, local, peer, limits.body_idle).await) }
    });
    if let Err(e) = serve_small(io, svc, limits, stop).await {
        tracing::debug!(client = %peer, error = %e, "admin connection ended");
    }
}

async fn handle(
    jobs: &Arc<Jobs>,
    req: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
    body_idle: Duration,
) -> Response<Own> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let query = req.uri().query().unwrap_or_default().to_string();
    if let Err(Denial {
        rule,
        status,
        message,
    }) = policy::decide_admin(&method, &path)
    {
        tracing::warn!(identity = "admin", client = %peer, %method, %path, rule, "request denied");
        jobs.metrics().denied(rule);
        return error_response(status, &message);
    }
    let audit_of = path
        .strip_prefix("/berth/v1/jobs/")
        .and_then(|p| p.strip_suffix("/audit"));
    // What is only read: one method.
    let read_only = matches!(
        path.as_str(),
        "/berth/v1/metrics" | "/berth/v1/capacity" | "/berth/v1/pool"
    ) || audit_of.is_some();
    if read_only && method != Method::GET {
        return method_not_allowed();
    }
    if path == "/berth/v1/metrics" {
        let text = jobs.metrics().render(&jobs.snapshot());
        let mut r = Response::new(Full::new(Bytes::from(text)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        return r;
    }
    if let Some(id) = audit_of {
        return match jobs.audit().read(id) {
            Some(lines) => {
                let mut r = Response::new(Full::new(Bytes::from(lines)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/x-ndjson"),
                );
                r
            }
            None => error_response(
                StatusCode::NOT_FOUND,
                &format!("berth: no audit records for job {id} (unknown, or past the retention)"),
            ),
        };
    }
    if path == "/berth/v1/capacity" {
        return json_response(StatusCode::OK, &jobs.capacity());
    }
    if path == "/berth/v1/pool" {
        return json_response(StatusCode::OK, &jobs.pool_view());
    }
    if path == "/berth/v1/caches" {
        return caches(jobs, &method, &query);
    }
    let id = path.strip_prefix("/berth/v1/jobs/").map(str::to_string);
    match (method, id) {
        (Method::POST, None) => create(jobs, req, local, peer, body_idle).await,
        (Method::GET, None) => json_response(StatusCode::OK, &jobs.list()),
        (Method::GET, Some(id)) => {
            match valid_id(&id).and_then(|()| jobs.get(&id).ok_or(StatusCode::NOT_FOUND)) {
                Ok(v) => json_response::<JobView>(StatusCode::OK, &v),
                Err(s) => error_response(s, &format!("berth: no such job: {id}")),
            }
        }
        (Method::DELETE, Some(id)) => {
            if let Err(s) = valid_id(&id) {
                return error_response(s, &format!("berth: no such job: {id}"));
            }
            let outcome = match outcome_of(&query) {
                Ok(o) => o,
                Err(why) => return error_response(StatusCode::BAD_REQUEST, &why),
            };
            match jobs.delete_with(&id, outcome).await {
                Ok(()) => {
                    tracing::info!(job = %id, client = %peer, "job deleted");
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                Err(JobError::NotFound(_)) => {
                    error_response(StatusCode::NOT_FOUND, &format!("berth: no such job: {id}"))
                }
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("berth: {e}")),
            }
        }
        _ => method_not_allowed(),
    }
}

/// `GET /berth/v1/caches`: every key with a state; `DELETE
/// /berth/v1/caches?key=KEY`: removes one (404 when it has none).
fn caches(jobs: &Jobs, method: &Method, query: &str) -> Response<Own> {
    let Some(pool) = jobs.project_caches() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "berth: this agent keeps no project caches ([project_caches] enabled = true turns them on)",
        );
    };
    match *method {
        Method::GET => match pool.store.list() {
            Ok(keys) => json_response(StatusCode::OK, &keys),
            Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("berth: {e}")),
        },
        Method::DELETE => {
            let key = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "key")
                .map(|(_, v)| v.into_owned());
            let key = match key.map(crate::sandbox::fs::caches::Key::new) {
                Some(Ok(k)) => k,
                Some(Err(e)) => {
                    return error_response(StatusCode::BAD_REQUEST, &format!("berth: {e}"));
                }
                None => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "berth: DELETE /berth/v1/caches takes key=KEY",
                    );
                }
            };
            match pool.store.remove(&key) {
                Ok(true) => {
                    tracing::info!(key = %key, "project cache removed");
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                Ok(false) => error_response(
                    StatusCode::NOT_FOUND,
                    &format!("berth: no project cache for key {key}"),
                ),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("berth: {e}")),
            }
        }
        _ => method_not_allowed(),
    }
}

/// `DELETE /berth/v1/jobs/{id}?outcome=success|failure`: how the job
/// ended, as its caller says (a keyed job commits on it).
pub(super) fn outcome_of(query: &str) -> Result<Outcome, String> {
    let mut outcome = Outcome::Unknown;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("outcome", "success") => outcome = Outcome::Success,
            ("outcome", "failure") => outcome = Outcome::Failure,
            ("outcome", other) => {
                return Err(format!(
                    "berth: outcome={other:?}: a job ends with outcome=success or outcome=failure"
                ));
            }
            (other, _) => {
                return Err(format!(
                    "berth: unknown parameter {other:?} (DELETE takes outcome=success|failure)"
                ));
            }
        }
    }
    Ok(outcome)
}

fn method_not_allowed() -> Response<Own> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "berth: method not allowed on this path",
    )
}

/// A job request: empty (all defaults) or one JSON object, nothing else
/// (serde would take a struct from an array too).
fn parse_create(body: &[u8]) -> Result<CreateJob, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CreateJob::default());
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err(format!(
            "expected a JSON object such as {{\"ttl\": \"30m\"}}, got {}",
            match v {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            }
        ));
    }
    if v["ttl"].is_number() {
        tracing::warn!(
            ttl = %v["ttl"],
            "job API: a ttl as a number of seconds is deprecated; send a duration such as \"30m\""
        );
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn valid_id(id: &str) -> Result<(), StatusCode> {
    if valid_job_id(id) {
        Ok(())
    } else {
        Err(StatusCode::NOT_FOUND)
    }
}

async fn create(
    jobs: &Arc<Jobs>,
    req: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
    body_idle: Duration,
) -> Response<Own> {
    let empty_ok = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .is_some_and(|v| v == "0");
    if !empty_ok && !is_json(&req) {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "berth: POST /berth/v1/jobs takes Content-Type: application/json",
        );
    }
    let host = endpoint_host(&req, local);
    let body = match read_body(req.into_body(), MAX_BODY, body_idle).await {
        Ok(b) => b,
        Err(r) => {
            tracing::info!(client = %peer, refusal = ?r, "job request body refused");
            return r.response();
        }
    };
    let spec = match parse_create(&body) {
        Ok(s) => s,
        Err(why) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("berth: invalid job request: {why}"),
            );
        }
    };
    match jobs.create(spec).await {
        Ok((view, bundle)) => {
            jobs.audit().record(crate::audit::Record::event(
                &view.id,
                "admin",
                &peer.to_string(),
                "created",
                201,
            ));
            created(view, bundle, &host, local.port())
        }
        Err(e) => create_failed(&e),
    }
}

/// The host a client reached the agent by (its `Host`, without the port),
/// for the endpoint it is given back.
pub(super) fn endpoint_host<B>(req: &Request<B>, local: SocketAddr) -> String {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h).to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| local.ip().to_string());
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    }
}

/// `201` with a new job's bundle: what `POST /berth/v1/jobs` and the token
/// exchange answer.
pub(super) fn created(
    view: JobView,
    bundle: crate::pki::Bundle,
    host: &str,
    port: u16,
) -> Response<Own> {
    json_response(
        StatusCode::CREATED,
        &Created {
            id: view.id,
            endpoint: format!("tcp://{host}:{port}"),
            address: view.address,
            ports: view.ports,
            expires_at: view.expires_at,
            ca: bundle.ca_pem,
            cert: bundle.cert_pem,
            key: bundle.key_pem,
        },
    )
}

/// Why a job was not made: the client's fault a 400, no room a 503.
pub(super) fn create_failed(e: &JobError) -> Response<Own> {
    match e {
        JobError::TtlTooLong { .. } | JobError::TtlTooShort | JobError::BadCache(_) => {
            error_response(StatusCode::BAD_REQUEST, &format!("berth: {e}"))
        }
        JobError::Sandbox(crate::sandbox::SandboxError::Config(e)) => {
            error_response(StatusCode::BAD_REQUEST, &format!("berth: {e}"))
        }
        JobError::Sandbox(e @ crate::sandbox::SandboxError::Slot(_)) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, &format!("berth: {e}"))
        }
        JobError::Sandbox(crate::sandbox::SandboxError::Workspace(w)) => {
            use crate::sandbox::fs::workspaces::{Refusal, WorkspaceError};
            let status = match w {
                WorkspaceError::Refused {
                    why: Refusal::InUse { .. },
                    ..
                } => StatusCode::CONFLICT,
                WorkspaceError::Refused { .. } => StatusCode::FORBIDDEN,
                WorkspaceError::Io { .. } => StatusCode::BAD_REQUEST,
                WorkspaceError::Idmap(_) | WorkspaceError::NoIdmap { .. } => {
                    tracing::error!(error = %w, "workspace could not be mounted");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            error_response(status, &format!("berth: {w}"))
        }
        e => {
            tracing::error!(error = %e, "job creation failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("berth: {e}"))
        }
    }
}
