//! What the agent counts, in the Prometheus (OpenMetrics) text format,
//! served to the admin identity at `GET /berth/v1/metrics`. Counters and
//! histograms are kept as things happen; the gauges (jobs by state, the warm
//! pool, free id ranges, memory, open connections) are read when scraped.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::sandbox::cgroup::Usage;

/// One label: its name and value.
type Labels = Vec<(&'static str, String)>;

fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

/// Seconds from 10 ms to about 80 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// What the scrape reads at that moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Jobs by state (`running`, `starting`, `unhealthy`, `failed`,
    /// `stopping`, `teardown-failed`).
    pub jobs: Vec<(String, i64)>,
    pub pool_size: i64,
    pub pool_ready: i64,
    pub free_ranges: i64,
    /// Keys with a state, and the bytes they hold (with project caches).
    pub project_caches: Option<(i64, i64)>,
    /// Tasks alive on the agent's runtime.
    pub tasks: i64,
}

pub struct Metrics {
    /// The request path's counters, made once: counting a request takes
    /// no lock and no allocation.
    by_class: [Counter; 5],
    to_daemon: Counter,
    to_client: Counter,
    starts: Family<Labels, Counter>,
    start_failures: Family<Labels, Counter>,
    ready: Histogram,
    teardown: Histogram,
    teardown_failures: Counter,
    job_cpu: Histogram,
    job_memory_peak: Histogram,
    denials: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    cache_starts: Family<Labels, Counter>,
    cache_commits: Family<Labels, Counter>,
    cache_commit_time: Histogram,
    cache_snapshot_time: Histogram,
    open: AtomicI64,
    // Read at scrape time.
    jobs: Family<Labels, Gauge>,
    pool_size: Gauge,
    pool_ready: Gauge,
    free_ranges: Gauge,
    cache_keys: Gauge,
    cache_bytes: Gauge,
    rss: Gauge,
    tasks: Gauge,
    connections: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth");
        let starts = Family::<Labels, Counter>::default();
        let start_failures = Family::<Labels, Counter>::default();
        let ready = seconds();
        let teardown = seconds();
        let teardown_failures = Counter::default();
        // From a hello job's tenth of a second to hours of builds.
        let job_cpu = Histogram::new(exponential_buckets(0.1, 4.0, 10));
        // 16 MiB to 64 GiB.
        let job_memory_peak = Histogram::new(exponential_buckets(16.0 * 1048576.0, 4.0, 7));
        let requests = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let denials = Family::<Labels, Counter>::default();
        let refused = Family::<Labels, Counter>::default();
        let cache_starts = Family::<Labels, Counter>::default();
        let cache_commits = Family::<Labels, Counter>::default();
        let cache_commit_time = seconds();
        // A reflink copy: milliseconds, whatever the key holds.
        let cache_snapshot_time = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let (cache_keys, cache_bytes) = (Gauge::default(), Gauge::default());
        let jobs = Family::<Labels, Gauge>::default();
        let (pool_size, pool_ready, free_ranges, rss, connections, tasks) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "sandbox_starts",
            "Sandboxes started, for a job or the warm pool (kind)",
            starts.clone(),
        );
        registry.register(
            "sandbox_start_failures",
            "Sandbox starts that failed, by reason",
            start_failures.clone(),
        );
        registry.register_with_unit(
            "sandbox_ready",
            "From a sandbox start to its dockerd answering",
            Unit::Seconds,
            ready.clone(),
        );
        registry.register_with_unit(
            "teardown",
            "Teardowns that finished: every trace of the job gone",
            Unit::Seconds,
            teardown.clone(),
        );
        registry.register(
            "teardown_failures",
            "Teardowns that failed (the job stays listed and is retried)",
            teardown_failures.clone(),
        );
        registry.register_with_unit(
            "job_cpu",
            "CPU time of each ended job, all its processes (user and system)",
            Unit::Seconds,
            job_cpu.clone(),
        );
        registry.register_with_unit(
            "job_memory_peak",
            "The most memory each ended job held at once, page cache included",
            Unit::Bytes,
            job_memory_peak.clone(),
        );
        registry.register(
            "proxy_requests",
            "Requests to jobs' daemons, by status class of the answer",
            requests.clone(),
        );
        registry.register_with_unit(
            "proxy",
            "Bytes through the proxy (direction: to_daemon, to_client)",
            Unit::Bytes,
            bytes.clone(),
        );
        registry.register(
            "denials",
            "Requests the policy denied, by rule",
            denials.clone(),
        );
        registry.register(
            "refused_connections",
            "Connections refused before any request (plaintext, handshake, certificate), by reason",
            refused.clone(),
        );
        registry.register(
            "project_cache_starts",
            "Jobs with a cache key, by whether their key had a state (result: hit, miss)",
            cache_starts.clone(),
        );
        registry.register(
            "project_cache_commits",
            "Commits of a job's disk to its key (result: committed, failed)",
            cache_commits.clone(),
        );
        registry.register_with_unit(
            "project_cache_commit",
            "From a keyed job's end to its disk being its key's state",
            Unit::Seconds,
            cache_commit_time.clone(),
        );
        registry.register_with_unit(
            "project_cache_snapshot",
            "A keyed job's copy of its key's state (a reflink of its disk)",
            Unit::Seconds,
            cache_snapshot_time.clone(),
        );
        registry.register(
            "project_cache_keys",
            "Project cache keys with a state",
            cache_keys.clone(),
        );
        registry.register_with_unit(
            "project_cache",
            "What the project caches' keys hold (blocks allocated, shared ones counted per key)",
            Unit::Bytes,
            cache_bytes.clone(),
        );
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register(
            "warm_pool_size",
            "Warm sandboxes the pool keeps",
            pool_size.clone(),
        );
        registry.register(
            "warm_pool_ready",
            "Warm sandboxes ready now",
            pool_ready.clone(),
        );
        registry.register(
            "free_id_ranges",
            "Id ranges (job slots) no job or sandbox holds",
            free_ranges.clone(),
        );
        registry.register_with_unit(
            "resident_memory",
            "The agent's resident memory",
            Unit::Bytes,
            rss.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections open now",
            connections.clone(),
        );
        registry.register(
            "tasks",
            "Tasks alive on the agent's runtime (starts, timers, health checks; not connections)",
            tasks.clone(),
        );
        let by_class = ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .map(|c| requests.get_or_create(&label("class", c)).clone());
        let to_daemon = bytes
            .get_or_create(&label("direction", "to_daemon"))
            .clone();
        let to_client = bytes
            .get_or_create(&label("direction", "to_client"))
            .clone();
        Metrics {
            by_class,
            to_daemon,
            to_client,
            starts,
            start_failures,
            ready,
            teardown,
            teardown_failures,
            job_cpu,
            job_memory_peak,
            denials,
            refused,
            cache_starts,
            cache_commits,
            cache_commit_time,
            cache_snapshot_time,
            open: AtomicI64::new(0),
            jobs,
            pool_size,
            pool_ready,
            free_ranges,
            cache_keys,
            cache_bytes,
            rss,
            tasks,
            connections,
            registry,
        }
    }

    /// A sandbox started (`kind`: `job` or `warm`) and answered after `took`.
    pub fn started(&self, kind: &'static str, took: Duration) {
        self.starts.get_or_create(&label("kind", kind)).inc();
        self.ready.observe(took.as_secs_f64());
    }

    pub fn start_failed(&self, reason: &'static str) {
        self.start_failures
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// A teardown finished after `took`; the job had used `usage`.
    pub fn torn_down(&self, took: Duration, usage: Option<Usage>) {
        self.teardown.observe(took.as_secs_f64());
        if let Some(u) = usage {
            self.job_cpu.observe(u.cpu.as_secs_f64());
            if let Some(peak) = u.memory_peak {
                self.job_memory_peak.observe(peak as f64);
            }
        }
    }

    /// A job with a cache key started from its key's state (`hit`) or
    /// empty; its copy of the state took `took`.
    pub fn cache_start(&self, hit: bool, took: Duration) {
        self.cache_snapshot_time.observe(took.as_secs_f64());
        let result = if hit { "hit" } else { "miss" };
        self.cache_starts
            .get_or_create(&label("result", result))
            .inc();
    }

    /// A keyed job's commit ended: its disk is the key's state after
    /// `took`, or it failed (the key kept its state).
    pub fn cache_commit(&self, took: Option<Duration>) {
        let result = if took.is_some() {
            "committed"
        } else {
            "failed"
        };
        self.cache_commits
            .get_or_create(&label("result", result))
            .inc();
        if let Some(t) = took {
            self.cache_commit_time.observe(t.as_secs_f64());
        }
    }

    pub fn teardown_failed(&self) {
        self.teardown_failures.inc();
    }

    /// A request answered with `status`.
    pub fn request(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }

    /// Bytes moved through the proxy.
    pub fn moved(&self, to_daemon: u64, to_client: u64) {
        self.to_daemon.inc_by(to_daemon);
        self.to_client.inc_by(to_client);
    }

    pub fn denied(&self, rule: &'static str) {
        self.denials.get_or_create(&label("rule", rule)).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&label("reason", reason)).inc();
    }

    /// Counts a client connection while the guard lives.
    pub fn connection(&self) -> ConnectionGuard<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self)
    }

    /// The whole exposition, gauges read from `now`.
    pub fn render(&self, now: &Snapshot) -> String {
        self.jobs.clear();
        for (state, n) in &now.jobs {
            self.jobs
                .get_or_create(&label("state", state.clone()))
                .set(*n);
        }
        self.pool_size.set(now.pool_size);
        self.pool_ready.set(now.pool_ready);
        self.free_ranges.set(now.free_ranges);
        let (keys, bytes) = now.project_caches.unwrap_or_default();
        self.cache_keys.set(keys);
        self.cache_bytes.set(bytes);
        self.rss.set(resident_bytes().unwrap_or(0));
        self.tasks.set(now.tasks);
        self.connections.set(self.open.load(Ordering::Relaxed));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub struct ConnectionGuard<'a>(&'a Metrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// This process's resident set, from /proc/self/statm.
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??)
}

/// The state a job is counted under: the first word of its status.
pub fn state_of(status: &str) -> String {
    status
        .split(':')
        .next()
        .unwrap_or(status)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_what_was_counted_and_read() {
        let m = Metrics::new();
        m.started("job", Duration::from_millis(300));
        m.started("warm", Duration::from_millis(250));
        m.start_failed("not_ready");
        m.torn_down(
            Duration::from_millis(60),
            Some(Usage {
                cpu: Duration::from_millis(1500),
                memory_peak: Some(200 << 20),
            }),
        );
        m.torn_down(Duration::from_millis(60), None);
        m.request(200);
        m.request(204);
        m.request(403);
        m.moved(10, 2000);
        m.denied("job-api-needs-admin");
        m.refused("plaintext");
        let _c = m.connection();
        let text = m.render(&Snapshot {
            jobs: vec![("running".into(), 2), ("teardown-failed".into(), 1)],
            pool_size: 2,
            pool_ready: 1,
            free_ranges: 5,
            project_caches: Some((3, 4096)),
            tasks: 7,
        });
        for line in [
            "berth_sandbox_starts_total{kind=\"job\"} 1",
            "berth_sandbox_start_failures_total{reason=\"not_ready\"} 1",
            "berth_sandbox_ready_seconds_count 2",
            "berth_teardown_seconds_count 2",
            "berth_job_cpu_seconds_count 1",
            "berth_job_cpu_seconds_sum 1.5",
            "berth_job_cpu_seconds_bucket{le=\"1.6\"} 1",
            "berth_job_cpu_seconds_bucket{le=\"0.4\"} 0",
            "berth_job_memory_peak_bytes_sum 209715200.0",
            "berth_proxy_requests_total{class=\"2xx\"} 2",
            "berth_proxy_requests_total{class=\"4xx\"} 1",
            "berth_proxy_bytes_total{direction=\"to_client\"} 2000",
            "berth_denials_total{rule=\"job-api-needs-admin\"} 1",
            "berth_refused_connections_total{reason=\"plaintext\"} 1",
            "berth_jobs{state=\"running\"} 2",
            "berth_jobs{state=\"teardown-failed\"} 1",
            "berth_warm_pool_ready 1",
            "berth_free_id_ranges 5",
            "berth_open_connections 1",
            "berth_tasks 7",
            "berth_project_cache_keys 3",
            "berth_project_cache_bytes 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        // Gauges follow what is read: a state that is gone leaves no line.
        let text = m.render(&Snapshot::default());
        assert!(!text.contains("berth_jobs{state=\"running\"}"), "{text}");
        assert_eq!(state_of("teardown-failed: busy"), "teardown-failed");
    }
}
