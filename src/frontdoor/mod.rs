//! The front door, in the order a request meets it:
//!
//! 1. [`server`]: accepts on the one TCP port, refuses plaintext in one line,
//!    runs each connection on a connection thread ([`workers`]) and counts
//!    refused peers ([`refusals`]); [`activation`] takes a socket from
//!    systemd instead of binding.
//! 2. [`tls`]: mutual TLS with a client certificate from the agent's CA; the
//!    identity is read once from the verified certificate.
//! 3. [`router`]: the admin identity reaches [`api`] (the job API), a job
//!    identity reaches [`proxy`] (its own job's daemon).
//! 4. [`policy`]: a pure decision on each request, a [`policy::Permit`] or a
//!    typed [`policy::Denial`]; the proxy forwards only with a permit.
//! 5. [`proxy`]: the request to the job's dockerd socket and its answer back,
//!    streamed, hijacks included.
//!
//! [`token`] is a listener of its own: an OIDC token in, a job bundle out.
//!
//! [`config`] holds the settings, checked with the PKI ([`tls::Tls::prepare`])
//! before anything on the host changes; [`http`] holds what the job API and
//! the proxy share.

pub mod activation;
pub mod api;
pub mod config;
pub mod http;
pub mod policy;
pub mod proxy;
pub mod refusals;
pub mod router;
pub mod server;
pub mod tls;
pub mod token;
pub mod workers;

pub use activation::inherited_listener;
pub use config::{ServeConfig, ServeError};
pub use server::Server;
pub use tls::Tls;
