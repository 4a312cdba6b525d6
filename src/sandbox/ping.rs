//! Readiness probe: `GET /_ping` on the job's private socket.

use std::path::Path;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// True when dockerd at `socket` answers `/_ping` with 200.
pub async fn ping(socket: &Path) -> bool {
    tokio::time::timeout(Duration::from_secs(2), try_ping(socket))
        .await
        .unwrap_or(false)
}

async fn try_ping(socket: &Path) -> bool {
    let Ok(stream) = tokio::net::UnixStream::connect(socket).await else {
        return false;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(req) = hyper::Request::get("/_ping")
        .header("host", "docker")
        .body(Empty::<Bytes>::new())
    else {
        return false;
    };
    matches!(sender.send_request(req).await, Ok(r) if r.status() == hyper::StatusCode::OK)
}
