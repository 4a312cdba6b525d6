//! The sandbox engine: one real dockerd per job, in fresh user, mount, pid,
//! network, ipc, uts and cgroup namespaces, on a host id range and a link of
//! its own, under whole-job cgroup limits. It starts jobs, watches them,
//! tears them down without a trace and recovers what a crashed agent left.
//! It knows nothing of TLS or HTTP clients: it hands out a unix socket.
//!
//! This file is the engine's face and its registry of live jobs. The work:
//! `host` (prepare the host once), `launch` (a start, step by step),
//! `protocol` + `child` (the agent and the job's side of a start),
//! `teardown` (an end, and recovery), `cgroup`, `net` (links, rules, DNS
//! relay, published ports), `fs` (a job's private root, its workspaces and
//! its disk), `slots`, `record`, `seed` (preloaded images shared between
//! jobs), `evidence`
//! (failed starts' logs), `health` (is a running job's dockerd answering);
//! `sys` is the only place that makes raw system calls. Registry settings,
//! the pull-through cache and preloads are host services in `crate::images`.

pub mod binfmt;
pub mod cgroup;
pub mod child;
pub mod config;
pub mod engines;
pub mod evidence;
pub mod fs;
mod health;
mod host;
mod launch;
pub mod net;
mod ping;
pub mod protocol;
pub mod record;
pub mod seed;
pub mod slots;
pub(crate) mod sys;
mod teardown;

use crate::locks::Lock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use cgroup::{JobCgroup, Layout};
pub use config::{ImageStore, Limits, SandboxConfig};
pub use fs::workspaces::WorkspaceRequest;
pub use launch::StartRequest;
pub use net::ports::PortRange;
/// Whether a dockerd answers `/_ping` on a socket (the engine's readiness check).
pub use ping::ping;
pub use record::JobRecord;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Prerequisite(String),
    #[error(transparent)]
    Slot(#[from] slots::SlotError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Dns(#[from] net::dns::DnsError),
    #[error(transparent)]
    Preload(#[from] crate::images::preload::PreloadError),
    #[error(transparent)]
    Seed(#[from] seed::SeedError),
    #[error(transparent)]
    Disk(#[from] fs::disk::DiskError),
    #[error(transparent)]
    Idmap(#[from] fs::idmap::IdmapError),
    #[error(transparent)]
    Workspace(#[from] fs::workspaces::WorkspaceError),
    #[error(transparent)]
    Engine(#[from] engines::EngineError),
    #[error(transparent)]
    Cache(#[from] crate::images::cache::CacheError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job {id} failed to start: {why}")]
    Start { id: String, why: String },
    #[error("job {id}'s dockerd did not answer /_ping within {timeout:?}")]
    NotReady { id: String, timeout: Duration },
    /// A start that failed, with what its log said (the log itself is kept
    /// under `<state>/failed/`; the job's directory is gone).
    #[error("{source}{}", show_evidence(.kept))]
    StartFailed {
        id: String,
        source: Box<SandboxError>,
        kept: Option<evidence::Kept>,
    },
    #[error("no such job: {0}")]
    NoSuchJob(String),
    /// Something of the job could not be removed; it stays in the books as
    /// `teardown-failed` and is retried.
    #[error("teardown of job {id} failed (it stays listed and is retried): {source}")]
    TeardownFailed {
        id: String,
        source: Box<SandboxError>,
    },
}

fn show_evidence(kept: &Option<evidence::Kept>) -> String {
    match kept {
        Some(k) if !k.tail.is_empty() => format!(
            "\n  the job's log ends with (all of it kept in {}):\n{}",
            k.path.display(),
            k.tail
        ),
        Some(k) => format!(" (the job's log, empty, is {})", k.path.display()),
        None => String::new(),
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { what, path, source }
}

/// Life of a job as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Starting,
    Running,
    /// Running, but its dockerd has stopped answering (hung, stopped, or
    /// overwhelmed); back to Running when it answers again.
    Unhealthy(String),
    /// The job's dockerd (or its init) ended without being asked to.
    Failed(String),
    Stopping,
    /// A teardown left something of the job on the host; it is retried.
    TeardownFailed(String),
    Stopped,
}

/// A live job. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    /// In step with the record on disk (pids are filled in during start).
    record: Mutex<JobRecord>,
    dir: PathBuf,
    status: watch::Sender<Status>,
    /// Some(exit code) once the job's monitor has exited.
    exited: watch::Receiver<Option<i32>>,
    relay: Mutex<Option<net::dns::Relay>>,
    /// The job's mount namespaces, once it has them.
    mounts: Mutex<Option<JobMounts>>,
    started: Instant,
    /// A keyed job: whether its key had a state to start from, and how
    /// long its copy of that state took.
    cache_hit: std::sync::OnceLock<(bool, std::time::Duration)>,
}

/// What the agent holds of a job's mounts: its mount namespace, and the
/// stage-1 helper's from before it, where the job's drop point has its
/// master (held open: it has no process of its own).
struct JobMounts {
    job: std::os::fd::OwnedFd,
    outer: std::os::fd::OwnedFd,
    /// Workspaces attached through the drop point so far (their names
    /// there: 0, 1, …).
    attached: usize,
}

impl Sandbox {
    /// For a job with a cache key: whether it started from the key's state
    /// (false: the key had none, and the job started empty).
    pub fn cache_hit(&self) -> Option<bool> {
        self.inner.cache_hit.get().map(|(hit, _)| *hit)
    }

    /// For a job with a cache key: how long its copy of the key's state
    /// (its snapshot) took.
    pub fn cache_snapshot_time(&self) -> Option<std::time::Duration> {
        self.inner.cache_hit.get().map(|(_, took)| *took)
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }
    pub fn record(&self) -> JobRecord {
        self.inner.record.locked().clone()
    }
    /// The job's private Docker API socket.
    pub fn socket(&self) -> PathBuf {
        api_socket(&self.inner.dir)
    }
    pub fn dockerd_log(&self) -> PathBuf {
        self.inner.dir.join("dockerd.log")
    }
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }
    /// Follows the job's status as it changes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }
    pub fn age(&self) -> Duration {
        self.inner.started.elapsed()
    }
    /// Resolves once the job is no longer running (failed or stopped).
    pub async fn ended(&self) -> Status {
        let mut rx = self.inner.status.subscribe();
        let s = rx
            .wait_for(|s| {
                matches!(
                    s,
                    Status::Failed(_) | Status::Stopped | Status::TeardownFailed(_)
                )
            })
            .await
            .map(|s| s.clone());
        s.unwrap_or(Status::Stopped)
    }
    /// Host pids of every process of the job: from its cgroups, or (without
    /// delegated cgroups) every process running as an id of its exclusive range.
    pub fn pids(&self) -> Vec<u32> {
        let rec = self.record();
        match &rec.cgroup {
            Some(cg) => cg.pids(),
            None => pids_in_range(rec.host_id, config::RANGE_SIZE),
        }
    }
    /// Resident memory of every process of the job, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.pids().iter().map(|p| rss_of(*p)).sum()
    }
}

fn pids_in_range(first: u32, len: u32) -> Vec<u32> {
    let range = u64::from(first)..u64::from(first) + u64::from(len);
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("Uid:"))?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|uid| range.contains(&uid))
        })
        .collect()
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn api_socket(job_dir: &Path) -> PathBuf {
    job_dir.join("api").join("docker.sock")
}

/// What a teardown did, for logs and reports.
#[derive(Debug, Clone)]
pub struct Teardown {
    pub id: String,
    pub took: Duration,
    pub killed: bool,
    /// What the job used over its life (None where its cgroups could not
    /// tell).
    pub usage: Option<cgroup::Usage>,
}

enum SeedState {
    Unbuilt,
    Ready(Arc<seed::Seed>),
    /// Shared images are not available here; every job loads the archives.
    Off,
}

/// A job whose teardown failed: in the books (and its record on disk) until
/// a retry removes its last trace.
#[derive(Debug, Clone)]
pub struct Stuck {
    pub why: String,
    pub attempts: u32,
    /// When the job was created (from its record), seconds since the epoch.
    pub created_unix: u64,
    pub next_try: Instant,
}

pub struct Engine {
    cfg: Arc<SandboxConfig>,
    /// What preparing the host found and holds (the state dir's lock among
    /// it: two agents on one state dir would tear down each other's jobs).
    host: host::Prepared,
    /// The shared image store built from the preloads (see `seed`).
    seed: tokio::sync::Mutex<SeedState>,
    jobs: Mutex<HashMap<String, Sandbox>>,
    /// Live jobs' workspaces (host directories) and the job of each: a
    /// directory is one job's at a time, from its start until its teardown.
    workspaces: Arc<Mutex<Vec<(PathBuf, String)>>>,
    /// Jobs whose teardown failed, live or left by an earlier agent.
    stuck: Mutex<HashMap<String, Stuck>>,
    /// What an earlier agent left in the state dir, as found before this
    /// engine started anything: the jobs (ids) and the slot claims without
    /// a job. Recovery touches only these, so it can run beside new starts.
    left: Mutex<Left>,
}

#[derive(Default)]
struct Left {
    jobs: Vec<String>,
    /// (slot, owner) claims whose owner has no directory.
    claims: Vec<(u32, String)>,
}

impl Engine {
    /// Validates the configuration, checks every prerequisite and prepares the
    /// host (state dirs, cgroups, forwarding). Does not recover old jobs:
    /// call [`Engine::recover`] for that.
    pub fn new(cfg: SandboxConfig) -> Result<Engine, SandboxError> {
        let host = host::prepare(&cfg)?;
        let state = cfg.state_dir.clone();
        let left = Left {
            jobs: JobRecord::list_ids(&state),
            claims: slots::orphan_claims(&state, &|owner| record::job_dir(&state, owner).exists()),
        };
        Ok(Engine {
            left: Mutex::new(left),
            host,
            seed: tokio::sync::Mutex::new(SeedState::Unbuilt),
            cfg: Arc::new(cfg),
            jobs: Mutex::new(HashMap::new()),
            workspaces: Arc::new(Mutex::new(Vec::new())),
            stuck: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// True when jobs get delegated cgroups (ordinary dockerd); false when
    /// they fall back to `dockerd --rootless`.
    pub fn delegates_cgroups(&self) -> bool {
        self.host.layout.is_some()
    }

    pub fn mtu(&self) -> u32 {
        self.host.mtu
    }

    /// Job slots (id ranges) that no job or sandbox holds now.
    /// The project caches' pool, when enabled.
    pub fn project_caches(&self) -> Option<&fs::caches::Pool> {
        self.host.project_caches.as_deref()
    }

    pub fn free_slots(&self) -> usize {
        slots::free(&self.cfg).unwrap_or(0)
    }

    /// Slots jobs may ever hold: id ranges clear of the host's own.
    pub fn usable_slots(&self) -> usize {
        slots::usable(&self.cfg).unwrap_or(0)
    }

    /// The shared pull-through cache, when enabled.
    pub fn cache(&self) -> Option<&crate::images::cache::Cache> {
        self.host.cache.as_ref()
    }

    pub fn get(&self, id: &str) -> Option<Sandbox> {
        self.jobs.locked().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Sandbox> {
        self.jobs.locked().values().cloned().collect()
    }

    /// Jobs whose teardown failed and is being retried.
    pub fn stuck(&self) -> Vec<(String, Stuck)> {
        let mut v: Vec<_> = self
            .stuck
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Ids of stuck jobs whose next teardown attempt is due.
    pub fn retries_due(&self) -> Vec<String> {
        let now = Instant::now();
        self.stuck()
            .into_iter()
            .filter(|(_, s)| s.next_try <= now)
            .map(|(id, _)| id)
            .collect()
    }
}

/// Wait before retry `n` (1-based) of something that failed: 2 s, doubling,
/// at most `cap`.
pub fn backoff(n: u32, cap: Duration) -> Duration {
    Duration::from_secs(2)
        .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
        .min(cap)
}

impl SandboxError {
    /// A short, stable name for what went wrong (a metrics label).
    pub fn reason(&self) -> &'static str {
        match self {
            SandboxError::Config(_) => "config",
            SandboxError::Prerequisite(_) | SandboxError::Engine(_) => "prerequisite",
            SandboxError::Slot(slots::SlotError::Exhausted { .. }) => "no_free_range",
            SandboxError::Slot(_) => "slot",
            SandboxError::Cgroup(_) => "cgroup",
            SandboxError::Net(_) | SandboxError::Dns(_) => "network",
            SandboxError::Preload(_) | SandboxError::Seed(_) => "images",
            SandboxError::Disk(_) => "disk",
            SandboxError::Cache(_) => "cache",
            SandboxError::NotReady { .. } => "not_ready",
            SandboxError::StartFailed { source, .. } => source.reason(),
            _ => "start_failed",
        }
    }
}

fn start_err(id: &str, why: impl std::fmt::Display) -> SandboxError {
    SandboxError::Start {
        id: id.into(),
        why: why.to_string(),
    }
}

/// Raw wait status → exit code (128+signal for a signal death).
fn code_of(raw: i32) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        -1
    }
}

/// How a job's init ends when the containerd it started ends: dockerd
/// runs no container without it (its own codes are 0 to 2, or a signal's).
pub const CONTAINERD_ENDED: i32 = 124;

pub fn describe_exit(code: i32) -> String {
    match code {
        0 => "dockerd exited".into(),
        CONTAINERD_ENDED => "the job's containerd ended (its log says how)".into(),
        c if c > 128 && c < 160 => {
            let sig = nix::sys::signal::Signal::try_from(c - 128)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| (c - 128).to_string());
            format!("dockerd was killed by {sig}")
        }
        c => format!("dockerd exited with code {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        let cap = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=10).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX, cap), cap);
        assert_eq!(backoff(0, cap), Duration::from_secs(2));
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(describe_exit(137), "dockerd was killed by SIGKILL");
        assert_eq!(describe_exit(1), "dockerd exited with code 1");
        assert_eq!(code_of(9), 137);
        assert_eq!(code_of(1 << 8), 1);
    }
}
