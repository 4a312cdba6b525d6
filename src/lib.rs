//! berth: a Docker-in-Docker CI build agent. Every job gets its own real
//! dockerd inside fresh user namespaces, on a host id range of its own.

pub mod cli;
pub mod sandbox;
