//! Per-job DNS relay on the host end of the job's link. The job's
//! resolv.conf names this address, so name resolution works for the job's
//! containers even when the host's resolver listens on loopback (which the
//! job, in its own network namespace, cannot reach).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot bind the job's DNS relay on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no upstream resolver: set dns_upstreams or add a nameserver to /etc/resolv.conf")]
    NoUpstream,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    tasks: JoinSet<()>,
}

impl Relay {
    pub async fn start(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Result<Relay, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let upstreams = Arc::new(upstreams);
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                addr: listen,
                source,
            })?;
        let tcp = TcpListener::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                addr: listen,
                source,
            })?;
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_udp(Arc::new(udp), upstreams.clone()));
        tasks.spawn(serve_tcp(tcp, upstreams));
        Ok(Relay { tasks })
    }

    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, upstreams: Arc<Vec<SocketAddr>>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "dns relay: recv");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (sock, upstreams) = (sock.clone(), upstreams.clone());
        tokio::spawn(async move {
            for up in upstreams.iter() {
                if let Some(answer) = ask_udp(*up, &query).await {
                    let _ = sock.send_to(&answer, client).await;
                    return;
                }
            }
        });
    }
}

async fn ask_udp(upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).await.ok()?;
    s.connect(upstream).await.ok()?;
    s.send(query).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, s.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn serve_tcp(listener: TcpListener, upstreams: Arc<Vec<SocketAddr>>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            for up in upstreams.iter() {
                let Ok(Ok(mut server)) =
                    tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(up)).await
                else {
                    continue;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                return;
            }
        });
    }
}
