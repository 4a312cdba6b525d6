//! The agent's jobs: a sandbox plus what the front door needs to know about
//! it (expiry, labels), TTL expiry, and the routing decision from a job
//! identity to that job's private dockerd socket. The warm pool
//! ([`pool`]) and the background upkeep ([`janitor`]) have files of their
//! own.

mod capacity;
mod janitor;
mod pool;

pub use capacity::{Bound, Capacity, Host, Limit, bounds, limits};

use pool::PoolHealth;
pub use pool::PoolView;

use crate::locks::Lock;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::audit::{Audit, Record};
use crate::metrics::{Metrics, Snapshot};
use crate::pki::{Bundle, Ca, Identity, PkiError};
use crate::sandbox::cgroup::Usage;
use crate::sandbox::fs::caches::Key;
use crate::sandbox::slots::SlotError;
use crate::sandbox::{
    Engine, Limits, PortRange, SandboxError, StartRequest, Status, WorkspaceRequest,
};

/// Remembered ended jobs, so a late client gets "ended" rather than "unknown".
const ENDED_MEMORY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("ttl {asked:?} is above the agent's maximum {max:?}")]
    TtlTooLong { asked: Duration, max: Duration },
    #[error("ttl must be at least 1 second")]
    TtlTooShort,
    #[error("no such job: {0}")]
    NotFound(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    BadCache(String),
}

/// When a keyed job's disk becomes its key's new project cache: at its
/// end, as its caller reports it (`DELETE …?outcome=success`); always;
/// or never.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheCommit {
    #[default]
    OnSuccess,
    Always,
    Never,
}

/// How a job ended, as the caller that removes it says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Not said (or the job expired).
    #[default]
    Unknown,
}

impl CacheCommit {
    /// Whether a job ending with `outcome` commits.
    pub fn commits(self, outcome: Outcome) -> bool {
        match self {
            CacheCommit::Always => true,
            CacheCommit::OnSuccess => outcome == Outcome::Success,
            CacheCommit::Never => false,
        }
    }
}

/// Why a job identity does not open a daemon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("berth: no job {0} on this agent")]
    Unknown(String),
    #[error("berth: job {0} has ended; its certificate no longer opens anything")]
    Ended(String),
    #[error("berth: job {0} has expired")]
    Expired(String),
    #[error("berth: job {id} failed: {why}")]
    Failed { id: String, why: String },
    #[error("berth: job {0} is not ready")]
    NotReady(String),
    #[error("berth: job {id} is unhealthy: {why}")]
    Unhealthy { id: String, why: String },
}

impl Refusal {
    /// A short, stable name (an audit rule).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Unknown(_) => "job-unknown",
            Refusal::Ended(_) => "job-ended",
            Refusal::Expired(_) => "job-expired",
            Refusal::Failed { .. } => "job-failed",
            Refusal::NotReady(_) => "job-not-ready",
            Refusal::Unhealthy { .. } => "job-unhealthy",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// A duration ("90s", "30m", "2h"); a number of seconds is read too
    /// (deprecated).
    #[serde(default, with = "crate::duration::text::option")]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Host directories bound into the job at their own path.
    #[serde(default)]
    pub workspaces: Vec<WorkspaceRequest>,
    /// The project cache the job starts from and commits to.
    #[serde(default)]
    pub cache_key: Option<Key>,
    /// When it commits (with `cache_key`).
    #[serde(default)]
    pub cache_commit: Option<CacheCommit>,
    /// A project cache the job starts from and never commits to.
    #[serde(default)]
    pub cache_from: Option<Key>,
    /// Whether the job runs foreign binaries (arm64 images and builds)
    /// through the host's emulators; the agent's `host_emulation` when
    /// absent. A job may go without: the engine's builder then no longer
    /// starts every emulator on each build to see which platforms it has.
    #[serde(default)]
    pub emulation: Option<bool>,
}

impl CreateJob {
    /// The key the job starts from and when it commits; a refusal names
    /// the fields that do not go together.
    pub(crate) fn cache(&self) -> Result<Option<(Key, CacheCommit)>, JobError> {
        match (&self.cache_key, &self.cache_from, self.cache_commit) {
            (Some(_), Some(_), _) => Err(JobError::BadCache(
                "cache_key and cache_from exclude each other: a job reads and commits one \
                 key, or reads one without committing"
                    .into(),
            )),
            (None, Some(_), Some(_)) => Err(JobError::BadCache(
                "cache_commit needs cache_key: a job started with cache_from never commits".into(),
            )),
            (None, None, Some(_)) => Err(JobError::BadCache("cache_commit needs cache_key".into())),
            (Some(k), None, c) => Ok(Some((k.clone(), c.unwrap_or_default()))),
            (None, Some(k), None) => Ok(Some((k.clone(), CacheCommit::Never))),
            (None, None, None) => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub status: String,
    /// The job's own address on the agent's host: every port its containers
    /// publish answers there, from the agent's host.
    pub address: String,
    /// The agent's host ports forwarded to the job (`"FIRST-LAST"`): the
    /// ports its containers publish without a fixed host port (`-p 80`,
    /// `-P`) come from here and answer at every address of the agent's host.
    pub ports: Option<PortRange>,
    pub created_at: u64,
    pub expires_at: u64,
    pub labels: BTreeMap<String, String>,
    /// Host directories bound into the job, at these same paths.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<std::path::PathBuf>,
    /// Whether the job runs foreign binaries through the host's emulators
    /// (None once its sandbox is gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emulation: Option<bool>,
}

struct Meta {
    created: SystemTime,
    expires: SystemTime,
    labels: BTreeMap<String, String>,
    workspaces: Vec<std::path::PathBuf>,
    /// When the job commits to its key (`Never` without one).
    commit: CacheCommit,
    /// Its teardown has begun: the certificate opens nothing any more, but
    /// the job stays listed until its last trace is gone.
    ending: bool,
    /// The timer that ends the job at its expiry, stopped when the job
    /// ends first: left to run out, every ended job would keep a task
    /// until its ttl (a day at most), thousands of them on a busy agent.
    expiry: tokio::task::AbortHandle,
}

pub struct Jobs {
    engine: Arc<Engine>,
    ca: Arc<Ca>,
    meta: Mutex<HashMap<String, Meta>>,
    ended: Mutex<VecDeque<String>>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// Started sandboxes waiting for a job (the warm pool). Each is handed
    /// out once: its id range, state and certificate become the job's alone.
    pool: Mutex<VecDeque<crate::sandbox::Sandbox>>,
    pool_size: usize,
    pool_health: Mutex<PoolHealth>,
    refill: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A warm sandbox is starting (and holds an id range).
    warming: std::sync::atomic::AtomicBool,
    closing: std::sync::atomic::AtomicBool,
    /// Cancelled at shutdown: ends a warm-pool backoff at once.
    closed: tokio_util::sync::CancellationToken,
    metrics: Metrics,
    audit: Audit,
    /// The agent's runtime: sandboxes start, stop and expire there, whatever
    /// thread serves the request that asked for it (client connections live
    /// on their own threads), and a client that goes away mid-request does
    /// not cut a start or a teardown in half.
    rt: tokio::runtime::Handle,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Jobs {
    /// Must be called on the agent's runtime.
    pub fn new(
        engine: Arc<Engine>,
        ca: Arc<Ca>,
        default_ttl: Duration,
        max_ttl: Duration,
        pool_size: usize,
        audit: Audit,
    ) -> Arc<Jobs> {
        let jobs = Arc::new(Jobs {
            engine,
            ca,
            meta: Mutex::new(HashMap::new()),
            ended: Mutex::new(VecDeque::new()),
            default_ttl,
            max_ttl,
            pool: Mutex::new(VecDeque::new()),
            pool_size,
            pool_health: Mutex::new(PoolHealth::default()),
            refill: Mutex::new(None),
            warming: std::sync::atomic::AtomicBool::new(false),
            closing: std::sync::atomic::AtomicBool::new(false),
            closed: tokio_util::sync::CancellationToken::new(),
            metrics: Metrics::new(),
            audit,
            rt: tokio::runtime::Handle::current(),
        });
        jobs.start_janitor();
        jobs
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The agent's project caches, when it keeps them.
    pub fn project_caches(&self) -> Option<&crate::sandbox::fs::caches::Pool> {
        self.engine.project_caches()
    }

    /// The gauges of a scrape, read now.
    pub fn snapshot(&self) -> Snapshot {
        let mut jobs: BTreeMap<String, i64> = BTreeMap::new();
        for v in self.list() {
            *jobs.entry(crate::metrics::state_of(&v.status)).or_default() += 1;
        }
        let pool = self.pool_view();
        Snapshot {
            jobs: jobs.into_iter().collect(),
            pool_size: pool.size as i64,
            pool_ready: pool.ready as i64,
            free_ranges: self.engine.free_slots() as i64,
            project_caches: self
                .engine
                .project_caches()
                .and_then(|p| p.store.list().ok())
                .map(|keys| (keys.len() as i64, keys.iter().map(|k| k.bytes as i64).sum())),
            tasks: self.rt.metrics().num_alive_tasks() as i64,
        }
    }

    /// A sandbox start (`kind`: for a job or the warm pool), counted.
    async fn start_sandbox(
        &self,
        kind: &'static str,
        req: StartRequest<'_>,
    ) -> Result<crate::sandbox::Sandbox, SandboxError> {
        let t0 = std::time::Instant::now();
        let r = self.engine.start_for(req).await;
        match &r {
            Ok(_) => self.metrics.started(kind, t0.elapsed()),
            Err(e) => self.metrics.start_failed(e.reason()),
        }
        r
    }

    /// A teardown, counted.
    async fn end(&self, id: &str) -> Result<crate::sandbox::Teardown, SandboxError> {
        let r = self.engine.teardown(id).await;
        match &r {
            Ok(t) => self.metrics.torn_down(t.took, t.usage),
            Err(SandboxError::NoSuchJob(_)) => {}
            Err(_) => self.metrics.teardown_failed(),
        }
        r
    }

    /// A sandbox for a new job: a warm one (its workspaces brought in)
    /// when it asks for nothing but the defaults, else a fresh start. The
    /// warm pool never makes a job fail while one of its id ranges could
    /// serve it: when every range is in use, a warm sandbox (one still
    /// starting is waited for) is handed out or, for other limits, torn
    /// down to free its range.
    async fn sandbox_for(
        &self,
        standard: bool,
        req: StartRequest<'_>,
    ) -> Result<crate::sandbox::Sandbox, JobError> {
        let workspaces = req.workspaces;
        // A warm sandbox's disk is fixed when its dockerd starts: a keyed
        // job starts from its key. Its emulators are the agent's.
        let emulation = self.engine.emulation(req.emulation)?;
        let standard =
            standard && req.key.is_none() && emulation == self.engine.config().host_emulation;
        if standard && !workspaces.is_empty() {
            // Refused before a warm sandbox is spent on it.
            self.engine.check_workspaces(workspaces).await?;
        }
        if standard
            && let Some(sb) = self.take_pooled().await
            && let Some(sb) = self.bring_workspaces(sb, workspaces).await?
        {
            return Ok(sb);
        }
        loop {
            match self.start_sandbox("job", req.clone()).await {
                Err(SandboxError::Slot(SlotError::Exhausted { .. }))
                    if self.pool_holds_ranges() =>
                {
                    let warm = match self.take_pooled().await {
                        Some(sb) => Some(sb),
                        None => {
                            self.wait_for_refill().await;
                            self.take_pooled().await
                        }
                    };
                    let Some(sb) = warm else { continue };
                    if standard {
                        match self.bring_workspaces(sb, workspaces).await? {
                            Some(sb) => return Ok(sb),
                            None => continue,
                        }
                    }
                    tracing::info!(sandbox = %sb.id(), "freeing a warm sandbox's id range for a job with its own limits");
                    let _ = self.end(sb.id()).await;
                }
                r => return Ok(r?),
            }
        }
    }

    /// A warm sandbox with the job's workspaces brought in; None (and the
    /// sandbox torn down) when they could not be and a start should serve
    /// the job instead. A refusal is the job's error.
    async fn bring_workspaces(
        &self,
        sb: crate::sandbox::Sandbox,
        workspaces: &[WorkspaceRequest],
    ) -> Result<Option<crate::sandbox::Sandbox>, JobError> {
        if workspaces.is_empty() {
            return Ok(Some(sb));
        }
        match self.engine.attach_workspaces(&sb, workspaces).await {
            Ok(()) => Ok(Some(sb)),
            Err(e) => {
                let _ = self.end(sb.id()).await;
                if matches!(e, SandboxError::Workspace(_)) {
                    return Err(e.into());
                }
                tracing::warn!(sandbox = %sb.id(), error = %e,
                    "workspaces could not be brought into a warm sandbox; starting one for the job");
                Ok(None)
            }
        }
    }

    /// Starts a job and issues its client certificate, valid until the job
    /// expires. The job is torn down at expiry.
    pub async fn create(self: &Arc<Self>, req: CreateJob) -> Result<(JobView, Bundle), JobError> {
        let me = self.clone();
        self.on_agent(async move { me.create_here(req).await })
            .await
    }

    /// Runs `work` to its end on the agent's runtime.
    async fn on_agent<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, JobError>> + Send + 'static,
    ) -> Result<T, JobError> {
        match self.rt.spawn(work).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(JobError::ShuttingDown),
        }
    }

    async fn create_here(self: &Arc<Self>, req: CreateJob) -> Result<(JobView, Bundle), JobError> {
        let ttl = req.ttl.unwrap_or(self.default_ttl);
        if ttl < Duration::from_secs(1) {
            return Err(JobError::TtlTooShort);
        }
        if ttl > self.max_ttl {
            return Err(JobError::TtlTooLong {
                asked: ttl,
                max: self.max_ttl,
            });
        }
        let defaults = &self.engine.config().default_limits;
        let standard = req
            .limits
            .as_ref()
            .is_none_or(|l| l.or(defaults) == *defaults);
        let cache = req.cache()?;
        let sb = self
            .sandbox_for(
                standard,
                StartRequest {
                    limits: req.limits,
                    workspaces: &req.workspaces,
                    key: cache.as_ref().map(|(k, _)| k),
                    emulation: req.emulation,
                },
            )
            .await?;
        if let (Some(hit), Some(took)) = (sb.cache_hit(), sb.cache_snapshot_time()) {
            self.metrics.cache_start(hit, took);
        }
        self.refill_pool();
        let created = SystemTime::now();
        let expires = created + ttl;
        let id = sb.id().to_string();
        let bundle = match self.ca.issue_client(
            &Identity::Job(id.clone()),
            time::OffsetDateTime::from(expires),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.end(&id).await;
                return Err(e.into());
            }
        };
        let me = self.clone();
        let jid = id.clone();
        let expiry = self.rt.spawn(async move {
            tokio::time::sleep(ttl).await;
            let live = me.meta.locked().get(&jid).is_some_and(|m| !m.ending);
            if live {
                tracing::info!(job = %jid, "ttl expired: tearing the job down");
                if let Err(e) = me.delete_here(&jid).await {
                    tracing::error!(job = %jid, error = %e, "teardown at expiry");
                }
            }
        });
        self.meta.locked().insert(
            id.clone(),
            Meta {
                created,
                expires,
                labels: req.labels,
                workspaces: req.workspaces.iter().map(|w| w.path.clone()).collect(),
                commit: cache.map_or(CacheCommit::Never, |(_, c)| c),
                ending: false,
                expiry: expiry.abort_handle(),
            },
        );
        let view = self.view(&id).ok_or(JobError::NotFound(id))?;
        Ok((view, bundle))
    }

    fn view(&self, id: &str) -> Option<JobView> {
        let meta = self.meta.locked();
        let m = meta.get(id)?;
        let sb = self.engine.get(id);
        let rec = sb.as_ref().map(|s| s.record());
        let address = rec
            .as_ref()
            .map(|r| r.job_ip.to_string())
            .unwrap_or_default();
        let ports = rec.as_ref().and_then(|r| r.ports);
        let emulation = rec.as_ref().map(|r| r.emulation);
        let status = match sb.map(|s| s.status()) {
            Some(Status::Running) => "running".to_string(),
            Some(Status::Unhealthy(why)) => format!("unhealthy: {why}"),
            Some(Status::Failed(why)) => format!("failed: {why}"),
            Some(Status::TeardownFailed(why)) => format!("teardown-failed: {why}"),
            Some(Status::Starting) => "starting".into(),
            Some(Status::Stopping) | Some(Status::Stopped) | None => "stopping".into(),
        };
        Some(JobView {
            id: id.to_string(),
            status,
            address,
            ports,
            created_at: unix(m.created),
            expires_at: unix(m.expires),
            labels: m.labels.clone(),
            workspaces: m.workspaces.clone(),
            emulation,
        })
    }

    pub fn get(&self, id: &str) -> Option<JobView> {
        self.view(id)
            .or_else(|| self.list().into_iter().find(|v| v.id == id))
    }

    /// Every job that exists on the host: those of this agent, and those an
    /// earlier agent left whose teardown keeps failing.
    pub fn list(&self) -> Vec<JobView> {
        let ids: Vec<String> = self.meta.locked().keys().cloned().collect();
        let mut v: Vec<JobView> = ids.iter().filter_map(|id| self.view(id)).collect();
        for (id, stuck) in self.engine.stuck() {
            if !ids.contains(&id) {
                v.push(JobView {
                    id,
                    status: format!("teardown-failed: {}", stuck.why),
                    address: String::new(),
                    ports: None,
                    created_at: stuck.created_unix,
                    expires_at: 0,
                    labels: BTreeMap::new(),
                    workspaces: Vec::new(),
                    emulation: None,
                });
            }
        }
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Ends a job: from now on its certificate opens nothing.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), JobError> {
        self.delete_with(id, Outcome::Unknown).await
    }

    /// Tears job `id` down, committing its disk to its key where the job
    /// asked for that on `outcome`.
    pub async fn delete_with(self: &Arc<Self>, id: &str, outcome: Outcome) -> Result<(), JobError> {
        let (me, id) = (self.clone(), id.to_string());
        self.on_agent(async move { me.delete_ending(&id, outcome).await })
            .await
    }

    /// Tears job `id` down. It leaves the books only once its last trace is
    /// gone; a failed teardown keeps it listed (`teardown-failed`) and the
    /// janitor retries it.
    async fn delete_here(self: &Arc<Self>, id: &str) -> Result<(), JobError> {
        self.delete_ending(id, Outcome::Unknown).await
    }

    async fn delete_ending(self: &Arc<Self>, id: &str, outcome: Outcome) -> Result<(), JobError> {
        let (ours, commit) = match self.meta.locked().get_mut(id) {
            Some(m) => {
                let first = !m.ending;
                m.ending = true;
                (true, first && m.commit.commits(outcome))
            }
            None => (false, false),
        };
        if !ours && !self.engine.stuck().iter().any(|(s, _)| s == id) {
            return Err(JobError::NotFound(id.into()));
        }
        if commit {
            let t0 = std::time::Instant::now();
            let committed = self.engine.teardown_committing(id).await;
            self.metrics
                .cache_commit(committed.as_ref().ok().map(|_| t0.elapsed()));
            match committed {
                Ok((t, info)) => {
                    self.metrics.torn_down(t.took, t.usage);
                    tracing::info!(job = %id, key = %info.key, "job's disk committed to its key");
                    self.forget(id, t.usage);
                    return Ok(());
                }
                // The job is torn down (or tearing down) whatever the
                // commit did; the key keeps its state.
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "the commit to the job's key failed; the key keeps its state");
                }
            }
        }
        match self.end(id).await {
            Ok(t) => {
                self.forget(id, t.usage);
                Ok(())
            }
            // Another teardown of it finished first.
            Err(SandboxError::NoSuchJob(_)) => {
                self.forget(id, None);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Job `id` is gone from the host, having used `usage`: out of the
    /// books; its certificate now meets "ended".
    fn forget(self: &Arc<Self>, id: &str, usage: Option<Usage>) {
        // At its expiry the timer's own task ends the job and gets here;
        // its teardown is done by then, and the abort only ends the task.
        if let Some(m) = self.meta.locked().remove(id) {
            m.expiry.abort();
        }
        let mut ended = Record::event(id, "agent", "", "ended", 0);
        ended.cpu_ms = usage.map(|u| u.cpu.as_millis() as u64);
        ended.memory_peak_bytes = usage.and_then(|u| u.memory_peak);
        self.audit.record(ended);
        self.audit.close(id);
        {
            let mut ended = self.ended.locked();
            ended.push_back(id.to_string());
            if ended.len() > ENDED_MEMORY {
                ended.pop_front();
            }
        }
        // Its id range is free: the pool may have been short of one.
        self.refill_pool();
    }

    /// The private socket of job `id`'s dockerd, or why it is refused.
    pub fn route(&self, id: &str) -> Result<PathBuf, Refusal> {
        let expires = self
            .meta
            .locked()
            .get(id)
            .map(|m| (!m.ending).then_some(m.expires));
        let Some(expires) = expires else {
            return Err(if self.ended.locked().iter().any(|e| e == id) {
                Refusal::Ended(id.into())
            } else {
                Refusal::Unknown(id.into())
            });
        };
        let Some(expires) = expires else {
            return Err(Refusal::Ended(id.into()));
        };
        if SystemTime::now() >= expires {
            return Err(Refusal::Expired(id.into()));
        }
        let sb = self
            .engine
            .get(id)
            .ok_or_else(|| Refusal::Ended(id.into()))?;
        match sb.status() {
            Status::Running => Ok(sb.socket()),
            Status::Unhealthy(why) => Err(Refusal::Unhealthy { id: id.into(), why }),
            Status::Failed(why) => Err(Refusal::Failed { id: id.into(), why }),
            Status::Starting => Err(Refusal::NotReady(id.into())),
            Status::Stopping | Status::Stopped | Status::TeardownFailed(_) => {
                Err(Refusal::Ended(id.into()))
            }
        }
    }

    /// Resolves when job `id` stops being served (unhealthy, failed or
    /// ending), with the refusal its clients get from then on; never for a
    /// job this agent does not run.
    pub async fn unserved(&self, id: &str) -> Refusal {
        let Some(mut rx) = self.engine.get(id).map(|sb| sb.watch()) else {
            return std::future::pending().await;
        };
        let status = match rx.wait_for(|s| *s != Status::Running).await {
            Ok(s) => s.clone(),
            Err(_) => Status::Stopped,
        };
        match status {
            Status::Unhealthy(why) => Refusal::Unhealthy { id: id.into(), why },
            Status::Failed(why) => Refusal::Failed { id: id.into(), why },
            _ => Refusal::Ended(id.into()),
        }
    }

    /// Tears down every job and the warm pool (agent shutdown).
    pub async fn shutdown(self: &Arc<Self>) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.closed.cancel();
        let refill = self.refill.locked().take();
        if let Some(t) = refill {
            // Let a sandbox that is starting finish, so it is torn down below.
            let _ = t.await;
        }
        self.pool.locked().clear();
        let ids: Vec<String> = self.meta.locked().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.delete_here(&id).await {
                tracing::error!(job = %id, error = %e, "teardown at shutdown");
            }
        }
        for r in self.engine.shutdown().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "teardown at shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reads_and_commits_one_key_or_reads_one_without_committing() {
        let k = |t: &str| Some(Key::new(t).unwrap());
        let job = |key, commit, from| CreateJob {
            cache_key: key,
            cache_commit: commit,
            cache_from: from,
            ..Default::default()
        };
        assert_eq!(job(None, None, None).cache().unwrap(), None);
        assert_eq!(
            job(k("a"), None, None).cache().unwrap(),
            Some((Key::new("a").unwrap(), CacheCommit::OnSuccess))
        );
        assert_eq!(
            job(None, None, k("a")).cache().unwrap(),
            Some((Key::new("a").unwrap(), CacheCommit::Never))
        );
        for bad in [
            job(k("a"), None, k("b")),
            job(None, Some(CacheCommit::Always), k("b")),
            job(None, Some(CacheCommit::Always), None),
        ] {
            assert!(matches!(bad.cache(), Err(JobError::BadCache(_))));
        }
        let parsed: CreateJob =
            serde_json::from_str(r#"{"cache_key": "org/app", "cache_commit": "always"}"#).unwrap();
        assert_eq!(parsed.cache_commit, Some(CacheCommit::Always));
        assert!(serde_json::from_str::<CreateJob>(r#"{"cache_key": ""}"#).is_err());
        assert!(CacheCommit::OnSuccess.commits(Outcome::Success));
        assert!(!CacheCommit::OnSuccess.commits(Outcome::Unknown));
        assert!(CacheCommit::Always.commits(Outcome::Failure));
        assert!(!CacheCommit::Never.commits(Outcome::Success));
    }

    #[test]
    fn create_requests_parse_strictly() {
        let r: CreateJob = serde_json::from_str(r#"{"ttl":"10m","labels":{"ci":"x"}}"#).unwrap();
        assert_eq!(r.ttl, Some(Duration::from_secs(600)));
        let r: CreateJob = serde_json::from_str(r#"{"ttl":60}"#).unwrap();
        assert_eq!(r.ttl, Some(Duration::from_secs(60)));
        assert!(serde_json::from_str::<CreateJob>(r#"{"tll":60}"#).is_err());
        assert!(serde_json::from_str::<CreateJob>(r#"{"ttl":"soon"}"#).is_err());
    }
}
