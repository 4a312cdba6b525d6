//! Requests the engine itself makes to a job's dockerd on its private
//! socket: readiness (`GET /_ping`), whether containers are running (teardown
//! decides between a graceful stop and an immediate kill on it), loading
//! preloaded image archives, and what a job's disk sheds before it becomes
//! a project cache.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Sends one request to dockerd on `socket`; returns the status and the
/// whole answer.
async fn send<B>(
    socket: &Path,
    req: hyper::Request<B>,
) -> Result<(hyper::StatusCode, Bytes), String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot reach dockerd: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// A request without a body, and dockerd's answer whatever its status.
async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
) -> Result<(hyper::StatusCode, Bytes), String> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "docker")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    send(socket, req).await
}

async fn get(socket: &Path, path: &str) -> Option<(hyper::StatusCode, Bytes)> {
    request(socket, hyper::Method::GET, path).await.ok()
}

/// The id (`sha256:…`) of the image `name` names in the job, if any.
pub async fn image_id(socket: &Path, name: &str) -> Option<String> {
    let (status, body) = get(socket, &format!("/images/{name}/json")).await?;
    if status != hyper::StatusCode::OK {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("Id")?.as_str().map(str::to_string)
}

/// True when dockerd at `socket` answers `/_ping` with 200.
pub async fn ping(socket: &Path) -> bool {
    ping_within(socket, Duration::from_secs(2)).await
}

/// True when dockerd at `socket` answers `/_ping` with 200 within `patience`.
pub async fn ping_within(socket: &Path, patience: Duration) -> bool {
    matches!(
        tokio::time::timeout(patience, get(socket, "/_ping")).await,
        Ok(Some((hyper::StatusCode::OK, _)))
    )
}

/// Number of running containers, or None when dockerd does not answer.
pub async fn running_containers(socket: &Path) -> Option<usize> {
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(2), get(socket, "/containers/json"))
            .await
            .ok()??;
    if status != hyper::StatusCode::OK {
        return None;
    }
    serde_json::from_slice::<Vec<serde_json::Value>>(&body)
        .ok()
        .map(|v| v.len())
}

/// Streams the image archive at `tar` into dockerd (`POST /images/load`).
pub async fn load_image(socket: &Path, tar: &Path) -> Result<(), String> {
    let file = tokio::fs::File::open(tar)
        .await
        .map_err(|e| format!("cannot open {}: {e}", tar.display()))?;
    let body = http_body_util::StreamBody::new(futures_util::StreamExt::map(
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024),
        |r| r.map(hyper::body::Frame::data),
    ));
    let req = hyper::Request::post("/images/load?quiet=1")
        .header("host", "docker")
        .header("content-type", "application/x-tar")
        .body(body)
        .map_err(|e| e.to_string())?;
    let (status, text) = send(socket, req).await?;
    let text = String::from_utf8_lossy(&text);
    // The answer is a JSON stream; an error may come with a 200.
    let failed = text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v.get("error").and_then(|e| e.as_str()).map(str::to_string)
    });
    match (status.is_success(), failed) {
        (true, None) => Ok(()),
        (_, Some(e)) => Err(e),
        (false, None) => Err(format!("dockerd answered {status}: {}", text.trim())),
    }
}

/// A request without a body; an answer other than 2xx is an error.
async fn call(socket: &Path, method: hyper::Method, path: &str) -> Result<Bytes, String> {
    let (status, body) = request(socket, method, path).await?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!(
            "{path}: dockerd answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))
    }
}

/// The label that keeps a volume in a project cache (`docker volume create
/// --label berth.cache=keep`).
pub const KEEP_VOLUME_LABEL: &str = "berth.cache=keep";

/// What a job's dockerd sheds before its disk is committed to a project
/// cache: every container (running ones killed), every volume without
/// [`KEEP_VOLUME_LABEL`], and the networks no container uses. Images and
/// the build cache stay. `named_need_all`: the dockerd prunes named
/// volumes only when asked with the `all` filter (API 1.42, dockerd 23 on;
/// older ones prune them all and refuse the filter).
pub async fn shed_for_commit(socket: &Path, named_need_all: bool) -> Result<(), String> {
    let list = call(socket, hyper::Method::GET, "/containers/json?all=1").await?;
    let containers: Vec<serde_json::Value> =
        serde_json::from_slice(&list).map_err(|e| e.to_string())?;
    for c in containers {
        let Some(id) = c.get("Id").and_then(|i| i.as_str()) else {
            continue;
        };
        call(
            socket,
            hyper::Method::DELETE,
            &format!("/containers/{id}?force=1&v=1"),
        )
        .await?;
    }
    let mut filters = serde_json::json!({ "label!": { KEEP_VOLUME_LABEL: true } });
    if named_need_all {
        filters["all"] = serde_json::json!({ "true": true });
    }
    let filters = filters.to_string();
    call(
        socket,
        hyper::Method::POST,
        &format!(
            "/volumes/prune?filters={}",
            form_urlencoded::byte_serialize(filters.as_bytes()).collect::<String>()
        ),
    )
    .await?;
    call(socket, hyper::Method::POST, "/networks/prune").await?;
    Ok(())
}
