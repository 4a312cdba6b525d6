//! Per-job DNS relay on the host end of the job's link. The job's
//! resolv.conf names this address, so name resolution works for the job's
//! containers even when the host's resolver listens on loopback (which the
//! job, in its own network namespace, cannot reach). A job gets a bounded
//! share of the agent: so many queries and connections at once, each for a
//! bounded time; a failing socket backs off instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::backoff::Backoff;

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

/// How much one job's relay holds at once, and for how long.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// UDP queries waiting for an upstream; one beyond is dropped (the
    /// client retries, as it does for any lost datagram).
    udp_queries: usize,
    /// How long a UDP query waits for each upstream, and a TCP connection
    /// for each upstream to accept.
    upstream_timeout: Duration,
    /// TCP connections relayed at once; further ones wait in the listen
    /// backlog until one ends.
    tcp_connections: usize,
    /// How long a TCP connection is relayed before both ends are closed.
    tcp_lifetime: Duration,
}

const LIMITS: Limits = Limits {
    udp_queries: 64,
    upstream_timeout: Duration::from_secs(5),
    tcp_connections: 16,
    tcp_lifetime: Duration::from_secs(30),
};

/// A running relay; dropping it stops it.
pub struct Relay {
    tasks: JoinSet<()>,
    #[cfg(test)]
    addr: SocketAddr,
}

impl Relay {
    pub async fn start(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Result<Relay, DnsError> {
        Relay::with_limits(listen, upstreams, LIMITS).await
    }

    /// A relay on `listen` (UDP and TCP on one port: the UDP socket's when
    /// `listen` asks for any).
    async fn with_limits(
        listen: SocketAddr,
        upstreams: Vec<SocketAddr>,
        limits: Limits,
    ) -> Result<Relay, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let upstreams = Arc::new(upstreams);
        let bind = |source| DnsError::Bind {
            addr: listen,
            source,
        };
        let udp = UdpSocket::bind(listen).await.map_err(bind)?;
        let addr = udp.local_addr().map_err(bind)?;
        let tcp = TcpListener::bind(addr).await.map_err(bind)?;
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_udp(Arc::new(udp), upstreams.clone(), limits));
        tasks.spawn(serve_tcp(tcp, upstreams, limits));
        Ok(Relay {
            tasks,
            #[cfg(test)]
            addr,
        })
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

async fn serve_udp(sock: Arc<UdpSocket>, upstreams: Arc<Vec<SocketAddr>>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.udp_queries));
    let mut queries = JoinSet::new();
    let mut dropped = 0u64;
    let mut backoff = Backoff::new();
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => {
                backoff.reset();
                x
            }
            Err(e) => {
                tracing::debug!(error = %e, "dns relay: recv");
                backoff.wait().await;
                continue;
            }
        };
        while queries.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            dropped += 1;
            tracing::debug!(
                %client,
                dropped,
                in_flight = limits.udp_queries,
                "dns relay: query dropped, too many in flight"
            );
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, upstreams) = (sock.clone(), upstreams.clone());
        queries.spawn(async move {
            for up in upstreams.iter() {
                if let Some(answer) = ask_udp(*up, &query, limits.upstream_timeout).await {
                    // The slot is free before the client hears back: a
                    // client that asks again on the answer finds room.
                    drop(slot);
                    let _ = sock.send_to(&answer, client).await;
                    return;
                }
            }
        });
    }
}

async fn ask_udp(upstream: SocketAddr, query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).await.ok()?;
    s.connect(upstream).await.ok()?;
    s.send(query).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(timeout, s.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn serve_tcp(listener: TcpListener, upstreams: Arc<Vec<SocketAddr>>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.tcp_connections));
    let mut conns = JoinSet::new();
    let mut backoff = Backoff::new();
    loop {
        // A slot first: past the bound, connections wait in the kernel's
        // listen backlog, not in tasks of the agent.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        while conns.try_join_next().is_some() {}
        let client = match listener.accept().await {
            Ok((c, _)) => {
                backoff.reset();
                c
            }
            Err(e) => {
                tracing::debug!(error = %e, "dns relay: accept");
                backoff.wait().await;
                continue;
            }
        };
        let upstreams = upstreams.clone();
        conns.spawn(async move {
            let _slot = slot;
            let relayed = relay_tcp(client, &upstreams, limits.upstream_timeout);
            if tokio::time::timeout(limits.tcp_lifetime, relayed)
                .await
                .is_err()
            {
                tracing::debug!("dns relay: a TCP connection reached its lifetime, closed");
            }
        });
    }
}

async fn relay_tcp(mut client: TcpStream, upstreams: &[SocketAddr], timeout: Duration) {
    for up in upstreams {
        let Ok(Ok(mut server)) = tokio::time::timeout(timeout, TcpStream::connect(up)).await else {
            continue;
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// Bounds a wait that only a failure makes long.
    const FAILURE: Duration = Duration::from_secs(60);

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(FAILURE, f)
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing after {FAILURE:?}"))
    }

    /// A relay on loopback; its port is picked for UDP, and taken for TCP
    /// too unless something holds it there (then another is picked).
    async fn relay(upstream: SocketAddr, limits: Limits) -> Relay {
        for _ in 0..10 {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            match Relay::with_limits(any, vec![upstream], limits).await {
                Ok(r) => return r,
                Err(DnsError::Bind { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no loopback port free for UDP and TCP at once");
    }

    fn limits() -> Limits {
        Limits {
            // Held queries and connections stay held: only the test ends them.
            upstream_timeout: Duration::from_secs(600),
            tcp_lifetime: Duration::from_secs(600),
            ..LIMITS
        }
    }

    /// A DNS-over-TCP message: its length, then `n` as its bytes.
    fn tcp_query(n: u16) -> Vec<u8> {
        let mut m = 2u16.to_be_bytes().to_vec();
        m.extend(n.to_be_bytes());
        m
    }

    /// An upstream that accepts every connection and holds it until the
    /// relay closes its side; each connection's first query is reported.
    async fn tcp_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<u16>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut q = [0u8; 4];
                    if c.read_exact(&mut q).await.is_ok() {
                        let _ = tx.send(u16::from_be_bytes([q[2], q[3]]));
                    }
                    // Held open until the relay's side ends.
                    let mut rest = Vec::new();
                    let _ = c.read_to_end(&mut rest).await;
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn tcp_relays_at_most_its_bound_of_connections_and_the_next_when_one_ends() {
        let (up, mut seen) = tcp_upstream().await;
        let lim = limits();
        let r = relay(up, lim).await;
        let mut clients = Vec::new();
        for i in 0..20u16 {
            let mut c = TcpStream::connect(r.addr).await.unwrap();
            c.write_all(&tcp_query(i)).await.unwrap();
            clients.push(Some(c));
        }
        let mut relayed = Vec::new();
        for _ in 0..lim.tcp_connections {
            relayed.push(
                within("the bound's connections", seen.recv())
                    .await
                    .unwrap(),
            );
        }
        // One held client goes: its slot takes the next waiting one, and
        // only that one.
        let gone = relayed[0];
        clients[gone as usize] = None;
        let next = within("a waiting connection", seen.recv()).await.unwrap();
        assert!(!relayed.contains(&next), "{next} relayed twice");
        assert!(
            seen.try_recv().is_err(),
            "more than {} connections relayed at once",
            lim.tcp_connections
        );
        relayed.push(next);
        // Every waiting client gets its turn as others end.
        for k in 1..4 {
            clients[relayed[k] as usize] = None;
            relayed.push(within("a waiting connection", seen.recv()).await.unwrap());
        }
        relayed.sort();
        assert_eq!(relayed, (0..20).collect::<Vec<u16>>());
        assert!(seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_held_tcp_connection_is_closed_at_its_lifetime() {
        let (up, mut seen) = tcp_upstream().await;
        let r = relay(
            up,
            Limits {
                tcp_lifetime: Duration::from_millis(200),
                ..limits()
            },
        )
        .await;
        let mut c = TcpStream::connect(r.addr).await.unwrap();
        c.write_all(&tcp_query(7)).await.unwrap();
        assert_eq!(within("the relayed query", seen.recv()).await, Some(7));
        // The upstream never answers nor closes; the relay ends it.
        let mut rest = Vec::new();
        let end = within("the relay closing", c.read_to_end(&mut rest)).await;
        assert!(matches!(&end, Ok(0)) || end.is_err(), "{end:?} {rest:?}");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn udp_holds_at_most_its_bound_of_queries_and_answers_once_upstream_does() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let lim = limits();
        let r = relay(upstream.local_addr().unwrap(), lim).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(r.addr).await.unwrap();
        for i in 0..80u16 {
            client.send(&i.to_be_bytes()).await.unwrap();
        }
        // The upstream answers nothing yet: the relay holds the first
        // queries, up to its bound, and drops the rest.
        let mut held = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..lim.udp_queries {
            let (n, from) = within("a held query", upstream.recv_from(&mut buf))
                .await
                .unwrap();
            held.push((u16::from_be_bytes([buf[0], buf[1]]), n, from));
        }
        // One answer frees one slot; the client hears it.
        let (id, _, from) = held.pop().unwrap();
        upstream.send_to(&id.to_be_bytes(), from).await.unwrap();
        let n = within("the answer", client.recv(&mut buf)).await.unwrap();
        assert_eq!(&buf[..n], id.to_be_bytes());
        // The next query the upstream sees is one sent after that answer,
        // not one of those beyond the bound.
        client.send(&1000u16.to_be_bytes()).await.unwrap();
        let (n, from) = within("the next query", upstream.recv_from(&mut buf))
            .await
            .unwrap();
        assert_eq!(
            &buf[..n],
            1000u16.to_be_bytes(),
            "more than {} queries held at once",
            lim.udp_queries
        );
        held.push((1000, n, from));
        // Answered, every held query reaches the client.
        for (id, _, from) in &held {
            upstream.send_to(&id.to_be_bytes(), from).await.unwrap();
        }
        let mut answered = Vec::new();
        for _ in 0..held.len() {
            let n = within("an answer", client.recv(&mut buf)).await.unwrap();
            assert_eq!(n, 2);
            answered.push(u16::from_be_bytes([buf[0], buf[1]]));
        }
        answered.sort();
        let mut want: Vec<u16> = held.iter().map(|(id, _, _)| *id).collect();
        want.sort();
        assert_eq!(answered, want);
    }
}
