//! Step two: the identity a connection's certificate names picks what it
//! reaches. The admin identity reaches the job API and nothing else; a job
//! identity reaches its own job's daemon through the proxy and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::http::HttpLimits;
use super::policy::Policy;
use super::proxy::RELAY_BUFFER;
use super::{api, proxy};
use crate::jobs::Jobs;
use crate::pki::Identity;

/// What an authenticated connection may reach, and how it ends.
pub struct Reach {
    pub jobs: Arc<Jobs>,
    pub policy: Arc<Policy>,
    /// The front door's own address (the job API names it in endpoints).
    pub local: SocketAddr,
    pub limits: HttpLimits,
    /// The agent's shutdown: finish the request in flight, take no more.
    pub stop: tokio_util::sync::CancellationToken,
}

pub async fn route(
    mut tls: TlsStream<TcpStream>,
    identity: Identity,
    peer: SocketAddr,
    reach: &Reach,
) {
    let (jobs, limits, stop) = (reach.jobs.clone(), reach.limits, reach.stop.clone());
    match identity {
        Identity::Admin => api::serve(tls, jobs, reach.local, peer, limits, stop).await,
        Identity::Job(job) => {
            tracing::Span::current().record("job", job.as_str());
            // Room for a whole write buffer of hyper's, records included:
            // a batch of response bytes leaves in one write.
            tls.get_mut()
                .1
                .set_buffer_limit(Some(RELAY_BUFFER + RELAY_BUFFER / 8));
            let to = proxy::Job {
                jobs,
                policy: reach.policy.clone(),
                job,
                peer,
            };
            proxy::serve(tls, to, limits, stop).await
        }
    }
}
