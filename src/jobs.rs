//! The agent's jobs: a sandbox plus what the front door needs to know about
//! it (expiry, labels), TTL expiry, and the routing decision from a job
//! identity to that job's private dockerd socket.

use crate::locks::Lock;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::audit::{Audit, Record};
use crate::metrics::{Metrics, Snapshot};
use crate::pki::{Bundle, Ca, Identity, PkiError};
use crate::policy::Policy;
use crate::sandbox::slots::SlotError;
use crate::sandbox::{Engine, Limits, PortRange, SandboxError, Status};

/// Remembered ended jobs, so a late client gets "ended" rather than "unknown".
const ENDED_MEMORY: usize = 4096;

/// Longest wait between two tries to refill the warm pool (2 s after the
/// first failure, doubling): a host that cannot start jobs is not hammered.
const POOL_RETRY_CAP: Duration = Duration::from_secs(300);

/// How often failed teardowns are looked at (each has its own backoff).
const JANITOR_TICK: Duration = Duration::from_secs(1);

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
    /// Seconds, or a duration such as "90s", "30m", "2h".
    #[serde(default, deserialize_with = "de_ttl")]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn de_ttl<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        Secs(u64),
        Text(String),
    }
    match Option::<T>::deserialize(d)? {
        None => Ok(None),
        Some(T::Secs(s)) => Ok(Some(Duration::from_secs(s))),
        Some(T::Text(t)) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// "90", "90s", "30m", "2h", "1d".
pub fn parse_duration(t: &str) -> Result<Duration, String> {
    let t = t.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{t:?} is not a duration (use 90s, 30m, 2h)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{t:?}: unknown unit {unit:?} (use s, m, h, d)")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{t:?} is too long"))
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
}

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
struct PoolHealth {
    failures: u32,
    last_error: Option<String>,
    retry_at: Option<std::time::Instant>,
}

struct Meta {
    created: SystemTime,
    expires: SystemTime,
    labels: BTreeMap<String, String>,
    /// Its teardown has begun: the certificate opens nothing any more, but
    /// the job stays listed until its last trace is gone.
    ending: bool,
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
    policy: Policy,
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
        policy: Policy,
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
            policy,
            rt: tokio::runtime::Handle::current(),
        });
        jobs.start_janitor();
        jobs
    }

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
                let started = me.start_sandbox("warm", None).await;
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
    async fn take_pooled(&self) -> Option<crate::sandbox::Sandbox> {
        loop {
            let sb = self.pool.locked().pop_front()?;
            if sb.status() == Status::Running {
                return Some(sb);
            }
            tracing::warn!(sandbox = %sb.id(), status = ?sb.status(), "dropping a dead warm sandbox");
            let _ = self.end(sb.id()).await;
        }
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

    /// What a job's requests may ask of its daemon.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
        }
    }

    /// A sandbox start (`kind`: for a job or the warm pool), counted.
    async fn start_sandbox(
        &self,
        kind: &'static str,
        limits: Option<Limits>,
    ) -> Result<crate::sandbox::Sandbox, SandboxError> {
        let t0 = std::time::Instant::now();
        let r = self.engine.start(limits).await;
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
            Ok(t) => self.metrics.torn_down(t.took),
            Err(SandboxError::NoSuchJob(_)) => {}
            Err(_) => self.metrics.teardown_failed(),
        }
        r
    }

    /// A sandbox for a new job: a warm one when its limits are the
    /// defaults, else a fresh start. The warm pool never makes a job fail
    /// while one of its id ranges could serve it: when every range is in
    /// use, a warm sandbox (one still starting is waited for) is handed out
    /// or, for other limits, torn down to free its range.
    async fn sandbox_for(
        &self,
        standard: bool,
        limits: Option<Limits>,
    ) -> Result<crate::sandbox::Sandbox, JobError> {
        if standard && let Some(sb) = self.take_pooled().await {
            return Ok(sb);
        }
        loop {
            match self.start_sandbox("job", limits.clone()).await {
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
                        return Ok(sb);
                    }
                    tracing::info!(sandbox = %sb.id(), "freeing a warm sandbox's id range for a job with its own limits");
                    let _ = self.end(sb.id()).await;
                }
                r => return Ok(r?),
            }
        }
    }

    /// True while the warm pool holds an id range: a sandbox ready or one
    /// starting.
    fn pool_holds_ranges(&self) -> bool {
        self.pooled() > 0 || self.warming.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the warm sandbox being started (if any) is in the pool
    /// or has failed.
    async fn wait_for_refill(&self) {
        while self.warming.load(std::sync::atomic::Ordering::SeqCst) && self.pooled() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
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
        let sb = self.sandbox_for(standard, req.limits).await?;
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
        self.meta.locked().insert(
            id.clone(),
            Meta {
                created,
                expires,
                labels: req.labels,
                ending: false,
            },
        );
        let me = self.clone();
        let jid = id.clone();
        self.rt.spawn(async move {
            tokio::time::sleep(ttl).await;
            let live = me.meta.locked().get(&jid).is_some_and(|m| !m.ending);
            if live {
                tracing::info!(job = %jid, "ttl expired: tearing the job down");
                if let Err(e) = me.delete_here(&jid).await {
                    tracing::error!(job = %jid, error = %e, "teardown at expiry");
                }
            }
        });
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
        let ports = rec.and_then(|r| r.ports);
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
                });
            }
        }
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Ends a job: from now on its certificate opens nothing.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), JobError> {
        let (me, id) = (self.clone(), id.to_string());
        self.on_agent(async move { me.delete_here(&id).await })
            .await
    }

    /// Tears job `id` down. It leaves the books only once its last trace is
    /// gone; a failed teardown keeps it listed (`teardown-failed`) and the
    /// janitor retries it.
    async fn delete_here(self: &Arc<Self>, id: &str) -> Result<(), JobError> {
        let ours = match self.meta.locked().get_mut(id) {
            Some(m) => {
                m.ending = true;
                true
            }
            None => false,
        };
        if !ours && !self.engine.stuck().iter().any(|(s, _)| s == id) {
            return Err(JobError::NotFound(id.into()));
        }
        match self.end(id).await {
            // NoSuchJob: another teardown of it finished first.
            Ok(_) | Err(SandboxError::NoSuchJob(_)) => {
                self.forget(id);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Job `id` is gone from the host: out of the books; its certificate
    /// now meets "ended".
    fn forget(self: &Arc<Self>, id: &str) {
        self.meta.locked().remove(id);
        self.audit
            .record(Record::event(id, "agent", "", "ended", 0));
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

    /// Retries failed teardowns as their backoff comes due, until shutdown.
    fn start_janitor(self: &Arc<Self>) {
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
                    if jobs.end(&id).await.is_ok() {
                        tracing::info!(job = %id, "teardown retried and done");
                        jobs.forget(&id);
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

    /// The private socket of job `id`'s dockerd, or why it is refused.
    pub fn route(&self, id: &str) -> Result<PathBuf, Refusal> {
        let expires = self
            .meta
            .lock()
            .unwrap()
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
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
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
