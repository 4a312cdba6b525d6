//! What runs beside the jobs: failed teardowns retried as their backoff
//! comes due, audit files past their retention removed, and what an
//! earlier agent left recovered.

use std::sync::Arc;
use std::time::Duration;

use super::Jobs;

/// How often failed teardowns are looked at (each has its own backoff).
const JANITOR_TICK: Duration = Duration::from_secs(1);

impl Jobs {
    /// Retries failed teardowns as their backoff comes due, until shutdown.
    pub(super) fn start_janitor(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let closed = self.closed.clone();
        self.rt.spawn(async move {
            let mut ticks: u64 = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(JANITOR_TICK) => {}
                    _ = closed.cancelled() => return,
                }
                let Some(jobs) = me.upgrade() else { return };
                // Audit files past their retention, every ten minutes (and
                // at the first tick).
                if ticks.is_multiple_of(600) {
                    let removed = jobs.audit.expire();
                    if removed > 0 {
                        tracing::info!(removed, "audit files past their retention removed");
                    }
                }
                ticks += 1;
                for id in jobs.engine.retries_due() {
                    if let Ok(t) = jobs.end(&id).await {
                        tracing::info!(job = %id, "teardown retried and done");
                        jobs.forget(&id, t.usage);
                    }
                }
            }
        });
    }

    /// Tears down, in the background, what an earlier agent left in the
    /// state dir; what cannot be removed is listed and retried. The agent
    /// serves meanwhile: left jobs hold their own id ranges and addresses.
    pub fn recover_in_background(self: &Arc<Self>) {
        let me = self.clone();
        self.rt.spawn(async move {
            for r in me.engine.recover().await {
                if let Err(e) = r {
                    tracing::error!(error = %e, "recovery");
                }
            }
        });
    }
}
