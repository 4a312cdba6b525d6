//! The warm pool: sandboxes started ahead of demand so that a new job gets
//! one at once. One warms at a time; failures back off, doubling, so a host
//! that cannot start jobs is not hammered.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::Jobs;
use crate::locks::Lock;
use crate::sandbox::slots::SlotError;
use crate::sandbox::{SandboxError, StartRequest, Status};

/// Longest wait between two tries to refill the warm pool (2 s after the
/// first failure, doubling): a host that cannot start jobs is not hammered.
const POOL_RETRY_CAP: Duration = Duration::from_secs(300);

/// The warm pool as the job API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub size: usize,
    pub ready: usize,
    /// Warm starts that failed in a row (0 once one succeeds).
    pub failures: u32,
    pub last_error: Option<String>,
    /// When the next warm start is tried, while backing off.
    pub retry_in_secs: Option<u64>,
}

#[derive(Default)]
pub(super) struct PoolHealth {
    failures: u32,
    last_error: Option<String>,
    retry_at: Option<std::time::Instant>,
}

impl Jobs {
    /// Number of warm sandboxes ready now.
    pub fn pooled(&self) -> usize {
        self.pool.locked().len()
    }

    /// Starts sandboxes in the background until the pool is full. One at a
    /// time: a burst of jobs must not stall the machine.
    pub fn refill_pool(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.pool_size == 0 || self.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut slot = self.refill.locked();
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let me = self.clone();
        *slot = Some(self.rt.spawn(async move {
            while !me.closing.load(Ordering::SeqCst) && me.pooled() < me.pool_size {
                me.warming.store(true, Ordering::SeqCst);
                let started = me.start_sandbox("warm", StartRequest::default()).await;
                me.warming.store(false, Ordering::SeqCst);
                match started {
                    // Every range serves a job: nothing to warm until one ends.
                    Err(SandboxError::Slot(SlotError::Exhausted { .. })) => break,
                    Ok(sb) => {
                        tracing::debug!(sandbox = %sb.id(), "warm sandbox ready");
                        me.pool.locked().push_back(sb);
                        *me.pool_health.locked() = PoolHealth::default();
                    }
                    Err(e) => {
                        let wait = {
                            let mut h = me.pool_health.locked();
                            h.failures += 1;
                            h.last_error = Some(e.to_string());
                            let wait = crate::sandbox::backoff(h.failures, POOL_RETRY_CAP);
                            h.retry_at = Some(std::time::Instant::now() + wait);
                            wait
                        };
                        tracing::error!(error = %e, retry_in = ?wait, "cannot start a warm sandbox");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = me.closed.cancelled() => break,
                        }
                    }
                }
            }
        }));
    }

    pub fn pool_view(&self) -> PoolView {
        let h = self.pool_health.locked();
        PoolView {
            size: self.pool_size,
            ready: self.pooled(),
            failures: h.failures,
            last_error: h.last_error.clone(),
            retry_in_secs: h.retry_at.map(|t| {
                t.saturating_duration_since(std::time::Instant::now())
                    .as_secs()
            }),
        }
    }

    /// A warm sandbox that is still healthy, if any.
    pub(super) async fn take_pooled(&self) -> Option<crate::sandbox::Sandbox> {
        loop {
            let sb = self.pool.locked().pop_front()?;
            if sb.status() == Status::Running {
                return Some(sb);
            }
            tracing::warn!(sandbox = %sb.id(), status = ?sb.status(), "dropping a dead warm sandbox");
            let _ = self.end(sb.id()).await;
        }
    }

    /// True while the warm pool holds an id range: a sandbox ready or one
    /// starting.
    pub(super) fn pool_holds_ranges(&self) -> bool {
        self.pooled() > 0 || self.warming.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the warm sandbox being started (if any) is in the pool
    /// or has failed.
    pub(super) async fn wait_for_refill(&self) {
        while self.warming.load(std::sync::atomic::Ordering::SeqCst) && self.pooled() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
