//! Small queries to the job's dockerd on its private socket: readiness
//! (`GET /_ping`) and whether containers are running (teardown decides
//! between a graceful stop and an immediate kill on it).

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

async fn get(socket: &Path, path: &str) -> Option<(hyper::StatusCode, Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "docker")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// True when dockerd at `socket` answers `/_ping` with 200.
pub async fn ping(socket: &Path) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), get(socket, "/_ping")).await,
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
