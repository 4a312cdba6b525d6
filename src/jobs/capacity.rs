//! Whether this agent can take another job, for a CI scheduler or a
//! readiness probe: the jobs it can start now (free id ranges and warm
//! sandboxes waiting), and the host's memory headroom.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Jobs;

/// What `GET /berth/v1/capacity` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// It takes another job now: not shutting down, and `free` > 0.
    pub accepting: bool,
    /// Jobs it can start now: `free_ranges` + `warm_ready`.
    pub free: usize,
    /// Id ranges no job or warm sandbox holds (of `uid_ranges`).
    pub free_ranges: usize,
    pub uid_ranges: usize,
    /// Warm sandboxes waiting for a job (of `warm_pool`).
    pub warm_ready: usize,
    pub warm_pool: usize,
    /// Jobs listed now, in any state.
    pub jobs: usize,
    /// The host's `MemAvailable` (0 when unreadable).
    pub memory_available_bytes: u64,
    /// What a job gets unless it asks otherwise (`default_limits`).
    pub job_memory_bytes: Option<u64>,
    pub shutting_down: bool,
}

impl Jobs {
    pub fn capacity(&self) -> Capacity {
        let cfg = self.engine.config();
        let free_ranges = self.engine.free_slots();
        let warm_ready = self.pooled();
        let shutting_down = self.closing.load(std::sync::atomic::Ordering::SeqCst);
        let free = free_ranges + warm_ready;
        Capacity {
            accepting: !shutting_down && free > 0,
            free,
            free_ranges,
            uid_ranges: cfg.uid_ranges as usize,
            warm_ready,
            warm_pool: self.pool_size,
            jobs: self.list().len(),
            memory_available_bytes: mem_available(&cfg.proc_root).unwrap_or(0),
            job_memory_bytes: cfg.default_limits.memory_bytes,
            shutting_down,
        }
    }
}

fn mem_available(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    parse_mem_available(&text)
}

/// `MemAvailable:  123456 kB` → bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let m = "MemTotal:       24563100 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(m), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    }
}
