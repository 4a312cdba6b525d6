//! `[serve]` of berth.toml: the front door's settings, checked as a whole
//! before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::Policy;
use crate::duration::text;
use crate::pki::PkiError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// CA, server and admin material (docker:dind layout plus `admin/`).
    pub certs_dir: PathBuf,
    /// Extra names and addresses for the server certificate.
    pub san: Vec<String>,
    /// Durations are humantime text ("10s", "24h"); the old `*_secs` keys
    /// (numbers of seconds) are still read.
    #[serde(with = "text", alias = "handshake_timeout_secs")]
    pub handshake_timeout: Duration,
    /// Time to receive a complete request head.
    #[serde(with = "text", alias = "header_timeout_secs")]
    pub header_timeout: Duration,
    /// A request body that sends nothing this long is cut (408).
    #[serde(with = "text", alias = "body_idle_timeout_secs")]
    pub body_idle_timeout: Duration,
    #[serde(with = "text", alias = "default_ttl_secs")]
    pub default_ttl: Duration,
    #[serde(with = "text", alias = "max_ttl_secs")]
    pub max_ttl: Duration,
    /// How long shutdown waits for open connections before cutting them.
    #[serde(with = "text", alias = "drain_secs")]
    pub drain: Duration,
    /// Sandboxes kept started so that a new job gets one at once (0: none).
    pub warm_pool: usize,
    /// Threads serving client connections (0: one per CPU).
    pub workers: usize,
    /// How long a job's audit file is kept after the job ends.
    #[serde(with = "text", alias = "audit_retention_secs")]
    pub audit_retention: Duration,
    /// Bound on one job's audit file; records past it are counted, not
    /// written.
    pub audit_max_bytes: u64,
    /// `[policy]` of the configuration file (a section of its own).
    #[serde(skip)]
    pub policy: Policy,
    /// `[token]` of the configuration file: the token exchange.
    #[serde(skip)]
    pub token: crate::oidc::TokenConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 2376)),
            certs_dir: "certs".into(),
            san: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            drain: Duration::from_secs(10),
            warm_pool: 2,
            workers: 0,
            audit_retention: Duration::from_secs(7 * 24 * 3600),
            audit_max_bytes: 16 << 20,
            policy: Default::default(),
            token: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {key}: {why}")]
    Config { key: &'static str, why: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot start the connection threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |key, why: &str| {
            Err(ServeError::Config {
                key,
                why: why.to_string(),
            })
        };
        if self.listen.port() == 2375 {
            return bad(
                "listen",
                "port 2375 is Docker's plaintext port; berth serves mutual TLS only (use 2376)",
            );
        }
        let secs = Duration::from_secs;
        let within = |d: Duration, max| (secs(1)..=secs(max)).contains(&d);
        if !within(self.handshake_timeout, 300) {
            return bad("handshake_timeout", "must be 1s..=5m");
        }
        if !within(self.header_timeout, 3600) {
            return bad("header_timeout", "must be 1s..=1h");
        }
        if !within(self.body_idle_timeout, 3600) {
            return bad("body_idle_timeout", "must be 1s..=1h");
        }
        if self.drain > secs(3600) {
            return bad("drain", "must be at most 1h");
        }
        if self.warm_pool > 64 {
            return bad(
                "warm_pool",
                "must be at most 64 (each warm sandbox holds about 115 MiB)",
            );
        }
        if let Err((key, why)) = self.policy.validate() {
            return Err(ServeError::Config { key, why });
        }
        if let Err((key, why)) = self.token.validate() {
            return Err(ServeError::Config { key, why });
        }
        if self.token.enabled
            && self.token.listen.port() != 0
            && self.token.listen.port() == self.listen.port()
        {
            return bad(
                "token.listen",
                "must be a port of its own: the front door's port takes client certificates only",
            );
        }
        if self.audit_max_bytes < 4096 {
            return bad("audit_max_bytes", "must be at least 4096");
        }
        if self.workers > 1024 {
            return bad("workers", "must be at most 1024 (0: one per CPU)");
        }
        if self.default_ttl < secs(1) || self.default_ttl > self.max_ttl {
            return bad("default_ttl", "must be at least 1s and at most max_ttl");
        }
        Ok(())
    }
}
