//! Connections refused before they reach a job or the job API (plaintext
//! HTTP, failed or slow TLS handshakes, missing or foreign certificates):
//! counted by reason, and logged at most once per reason per window, the
//! line saying how many went unlogged since the last one. An unauthenticated
//! peer can open connections as fast as it likes; it must not be able to
//! flood the agent's log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Plaintext,
    Handshake,
    HandshakeTimeout,
    NoCertificate,
    BadCertificate,
    /// A token the exchange refused (its kind is counted apart).
    Token,
}

impl Reason {
    /// A short, stable name (a metrics label).
    pub fn label(self) -> &'static str {
        match self {
            Reason::Plaintext => "plaintext",
            Reason::Handshake => "handshake",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::NoCertificate => "no_certificate",
            Reason::BadCertificate => "bad_certificate",
            Reason::Token => "token",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Reason::Plaintext => "plaintext HTTP on the TLS port refused",
            Reason::Handshake => "TLS handshake refused",
            Reason::HandshakeTimeout => "TLS handshake timed out",
            Reason::NoCertificate => "no client certificate",
            Reason::BadCertificate => "certificate refused",
            Reason::Token => "identity token refused",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    total: u64,
    unlogged: u64,
    last_logged: Option<Instant>,
}

/// The pure part: whether a refusal at `now` gets a log line.
#[derive(Debug)]
pub struct Limiter {
    window: Duration,
    by_reason: BTreeMap<Reason, Tally>,
}

impl Limiter {
    pub fn new(window: Duration) -> Limiter {
        Limiter {
            window,
            by_reason: BTreeMap::new(),
        }
    }

    /// Counts one refusal. `Some(n)`: log it now, `n` refusals of this
    /// reason having gone unlogged since the previous line; `None`: stay
    /// quiet.
    pub fn record(&mut self, reason: Reason, now: Instant) -> Option<u64> {
        let t = self.by_reason.entry(reason).or_default();
        t.total += 1;
        let due = t
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= self.window);
        if !due {
            t.unlogged += 1;
            return None;
        }
        t.last_logged = Some(now);
        Some(std::mem::take(&mut t.unlogged))
    }

    /// Refusals counted so far, by reason.
    pub fn totals(&self) -> Vec<(Reason, u64)> {
        self.by_reason.iter().map(|(r, t)| (*r, t.total)).collect()
    }
}

/// The agent's record of refused connections, shared by every connection
/// thread.
pub struct Refusals(Mutex<Limiter>);

/// At most one line per reason in this window.
pub const WINDOW: Duration = Duration::from_secs(10);

impl Default for Refusals {
    fn default() -> Self {
        Refusals(Mutex::new(Limiter::new(WINDOW)))
    }
}

impl Refusals {
    pub fn refused(
        &self,
        reason: Reason,
        peer: SocketAddr,
        detail: Option<&dyn std::fmt::Display>,
    ) {
        let logged = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(reason, Instant::now());
        let Some(unlogged) = logged else { return };
        let what = reason.describe();
        match detail {
            Some(d) => {
                tracing::warn!(client = %peer, error = %d, unlogged_since_last = unlogged, "{what}")
            }
            None => tracing::warn!(client = %peer, unlogged_since_last = unlogged, "{what}"),
        }
    }

    pub fn totals(&self) -> Vec<(Reason, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).totals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_per_window_with_what_went_unlogged() {
        let mut l = Limiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.record(Reason::Handshake, t0), Some(0));
        for i in 1..=99 {
            assert_eq!(
                l.record(Reason::Handshake, t0 + Duration::from_millis(i * 10)),
                None
            );
        }
        // Another reason has its own budget.
        assert_eq!(l.record(Reason::Plaintext, t0), Some(0));
        // The window has passed: one line, telling of the 99 in between.
        assert_eq!(
            l.record(Reason::Handshake, t0 + Duration::from_secs(10)),
            Some(99)
        );
        assert_eq!(
            l.record(Reason::Handshake, t0 + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            l.totals(),
            vec![(Reason::Plaintext, 1), (Reason::Handshake, 102)]
        );
    }
}
