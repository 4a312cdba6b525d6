//! The signals that end berth's foreground commands: SIGINT (Ctrl-C),
//! SIGTERM, and SIGHUP (the terminal went away). The handlers are installed
//! when a [`Stop`] is made, so a signal that arrives before anyone waits is
//! kept, not fatal: whatever berth started is always torn down.

use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Stop {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Stop {
    pub fn install() -> std::io::Result<Stop> {
        Ok(Stop {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next stop signal; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
