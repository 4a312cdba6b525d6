//! Whether a running job's dockerd still answers: it is asked `/_ping` on
//! its private socket every `health_interval`. Three silent checks in a row
//! make the job `Unhealthy` (an answer makes it `Running` again); a socket
//! nobody listens on any more makes it `Failed`. The front door refuses new
//! requests to a job that is not `Running` and ends those waiting on it.

use std::path::Path;
use std::time::Duration;

use super::{Sandbox, Status, ping};

/// Silent checks in a row before a job is unhealthy.
pub const MISSES: u32 = 3;

/// Watches `sb` until it ends.
pub fn watch(sb: Sandbox, every: Duration) {
    // A check waits at most this long for its answer.
    let patience = every.clamp(Duration::from_secs(1), Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut misses = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sb.ended() => return,
            }
            if !matches!(sb.status(), Status::Running | Status::Unhealthy(_)) {
                return;
            }
            match probe(&sb.socket(), patience).await {
                Probe::Answered => {
                    misses = 0;
                    let back = sb.inner.status.send_if_modified(|s| {
                        matches!(s, Status::Unhealthy(_)) && {
                            *s = Status::Running;
                            true
                        }
                    });
                    if back {
                        tracing::info!(job = %sb.id(), "job's dockerd answers again");
                    }
                }
                Probe::Gone(why) => {
                    let why = format!("its dockerd is gone ({why})");
                    let failed = sb.inner.status.send_if_modified(|s| {
                        matches!(s, Status::Running | Status::Unhealthy(_)) && {
                            *s = Status::Failed(why.clone());
                            true
                        }
                    });
                    if failed {
                        tracing::warn!(job = %sb.id(), %why, "job failed");
                    }
                    return;
                }
                Probe::Silent => {
                    misses += 1;
                    if misses < MISSES {
                        continue;
                    }
                    let why = format!(
                        "its dockerd has not answered /_ping for {misses} checks in a row \
                         ({every:?} apart, {patience:?} each)"
                    );
                    let marked = sb.inner.status.send_if_modified(|s| {
                        *s == Status::Running && {
                            *s = Status::Unhealthy(why.clone());
                            true
                        }
                    });
                    if marked {
                        tracing::warn!(job = %sb.id(), %why, "job unhealthy");
                    }
                }
            }
        }
    });
}

#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    Answered,
    /// Nothing listens on the socket: dockerd has exited.
    Gone(String),
    /// Connected, but no answer in time (stopped, hung or overwhelmed).
    Silent,
}

pub async fn probe(socket: &Path, patience: Duration) -> Probe {
    match tokio::net::UnixStream::connect(socket).await {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            return Probe::Gone(e.to_string());
        }
        // Anything else (e.g. a full backlog) is not proof of death.
        Err(_) => return Probe::Silent,
        Ok(_) => {}
    }
    if ping::ping_within(socket, patience).await {
        Probe::Answered
    } else {
        Probe::Silent
    }
}
