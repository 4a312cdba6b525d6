//! berth: a Docker-in-Docker CI build agent. Every job gets its own real
//! dockerd inside fresh user namespaces, on a host id range of its own,
//! reachable only through berth's mutual-TLS front door.

pub mod audit;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod doctor;
pub mod duration;
pub mod files;
pub mod frontdoor;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod images;
pub mod jobs;
pub mod locks;
pub mod metrics;
pub mod oidc;
pub mod pipeline;
pub mod pki;
pub mod runner;
pub mod sandbox;
pub mod signals;
