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
    /// What bounds how many jobs (warm sandboxes included) this host
    /// carries, the tightest first: see [`bounds`].
    #[serde(default)]
    pub bounds: Vec<Bound>,
    /// What the kernel bounds per job, or across jobs without capping their
    /// count: see [`limits`].
    #[serde(default)]
    pub limits: Vec<Limit>,
}

/// One thing that bounds how many jobs a host carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    /// `slots` (id ranges, addresses, port blocks), `memory`, `tasks` or
    /// `agent_fds`.
    pub name: String,
    /// The most jobs it allows, those running included.
    pub jobs: u64,
    /// Where the figure comes from, and what raises it.
    pub detail: String,
}

/// A kernel bound on what a job can do rather than on how many jobs run,
/// named so that a scheduler or an operator sees it before a job meets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// `inotify_instances`, `inotify_watches`, `keys`, `key_bytes` or
    /// `conntrack`.
    pub name: String,
    /// The kernel's bound, as its sysctl reads.
    pub max: u64,
    /// What the host's own table holds now, for a bound every job's
    /// traffic shares (`conntrack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<u64>,
    /// Whose the bound is, what it means for a job, and what raises it.
    pub detail: String,
}

impl Limit {
    /// How `berth doctor` names it.
    pub fn label(&self) -> &'static str {
        match self.name.as_str() {
            "inotify_instances" => "inotify instances",
            "inotify_watches" => "inotify watches",
            "keys" => "kernel keys",
            "key_bytes" => "kernel key bytes",
            "conntrack" => "conntrack",
            _ => "kernel limit",
        }
    }
}

/// Of a job's key quota, what one running container's session keyring
/// takes: runc names it `_ses.` and the container's 64-digit id, and the
/// kernel charges the name and its NUL (70 bytes a container measured in
/// `/proc/key-users`).
pub const SESSION_KEYRING_BYTES: u64 = 70;

/// The kernel bounds a job meets as it works, read from `proc_root`; what
/// cannot be read is left out. The kernel counts inotify instances and
/// watches against a user namespace's owner, and keys against the host user
/// that holds them; a job's namespace is owned by its first host id and its
/// ids are its own, so those bounds are every job's own. Connection
/// tracking counts each network namespace against one bound: a job's own
/// namespace, and the host's, which every job's egress and published ports
/// pass through.
pub fn limits(proc_root: &Path) -> Vec<Limit> {
    let number = |p: &str| proc_number(proc_root, &format!("sys/{p}"));
    let mut out = Vec::new();
    let mut push =
        |name: &str, max: Option<u64>, in_use: Option<u64>, detail: &dyn Fn(u64) -> String| {
            if let Some(max) = max {
                out.push(Limit {
                    name: name.into(),
                    max,
                    in_use,
                    detail: detail(max),
                });
            }
        };
    push(
        "inotify_instances",
        number("fs/inotify/max_user_instances"),
        None,
        &|m| {
            format!(
                "{m} inotify instances per job (fs.inotify.max_user_instances), each job's own; \
                 jobs whose containers watch many trees need more: \
                 sysctl -w fs.inotify.max_user_instances=8192"
            )
        },
    );
    push(
        "inotify_watches",
        number("fs/inotify/max_user_watches"),
        None,
        &|m| {
            format!(
                "{m} inotify watches per job (fs.inotify.max_user_watches), each job's own; \
                 raise with sysctl -w fs.inotify.max_user_watches=1048576"
            )
        },
    );
    let keys = number("kernel/keys/maxkeys");
    let key_bytes = number("kernel/keys/maxbytes");
    if let (Some(k), Some(b)) = (keys, key_bytes) {
        let containers = k.min(b / SESSION_KEYRING_BYTES);
        let raise = "raise both: sysctl -w kernel.keys.maxkeys=2000 kernel.keys.maxbytes=200000";
        push("keys", keys, None, &|m| {
            format!(
                "{m} keys per job (kernel.keys.maxkeys), each job's own; every running container \
                 holds a session keyring ({SESSION_KEYRING_BYTES} bytes), so a job runs about \
                 {containers} containers as one user at once; {raise}"
            )
        });
        push("key_bytes", key_bytes, None, &|m| {
            format!(
                "{m} bytes of keys per job (kernel.keys.maxbytes), each job's own: {} session \
                 keyrings; {raise}",
                m / SESSION_KEYRING_BYTES
            )
        });
    }
    let tracked = number("net/netfilter/nf_conntrack_count");
    push(
        "conntrack",
        number("net/netfilter/nf_conntrack_max"),
        tracked,
        &|m| {
            format!(
                "{m} tracked connections per network namespace (net.netfilter.nf_conntrack_max): \
                 each job's own namespace counts its containers' connections against it, and the \
                 host's table ({} in use) holds every job's egress and published ports; \
                 raise with sysctl -w net.netfilter.nf_conntrack_max=1048576",
                tracked.unwrap_or(0)
            )
        },
    );
    out
}

/// What an idle job costs, measured (`scripts/bench-suite`, density):
/// memory as PSS, every process of the job and its helpers, shared pages
/// counted once (31.3 MiB at 300 idle jobs, 34.6 at 30; the host's
/// MemAvailable lost 33.1 MiB a job at 300), rounded up.
pub const IDLE_JOB_BYTES: u64 = 40 << 20;
/// Tasks (threads) of an idle job: its monitor and init, dockerd's and
/// containerd's threads; 20 measured with dockerd 20.10, rounded up.
pub const IDLE_JOB_TASKS: u64 = 24;
/// Descriptors the agent holds per job: the helper's pidfd, the mount
/// namespaces it enters, its sockets, the audit file (6 measured with 4
/// jobs), rounded up.
pub const AGENT_FDS_PER_JOB: u64 = 8;

/// What the host allows and has in use, read from `/proc`; what cannot be
/// read is None (and bounds nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    pub mem_available: Option<u64>,
    /// The least of `kernel.pid_max` and `kernel.threads-max`.
    pub tasks_max: Option<u64>,
    /// Tasks (threads) on the host now.
    pub tasks: Option<u64>,
    /// This process's open descriptors and their soft bound.
    pub fds: Option<u64>,
    pub fds_max: Option<u64>,
}

impl Host {
    pub fn read(proc_root: &Path) -> Host {
        let read = |p: &str| std::fs::read_to_string(proc_root.join(p)).ok();
        let number = |p: &str| proc_number(proc_root, p);
        let tasks_max = match (
            number("sys/kernel/pid_max"),
            number("sys/kernel/threads-max"),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Host {
            mem_available: read("meminfo").and_then(|t| parse_mem_available(&t)),
            tasks_max,
            tasks: read("loadavg").and_then(|t| parse_tasks(&t)),
            fds: std::fs::read_dir(proc_root.join("self/fd"))
                .ok()
                .map(|d| d.count() as u64),
            fds_max: read("self/limits").and_then(|t| parse_nofile(&t)),
        }
    }
}

/// A file of `proc_root` (`sys/kernel/pid_max`) that holds one number.
fn proc_number(proc_root: &Path, path: &str) -> Option<u64> {
    std::fs::read_to_string(proc_root.join(path))
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

/// The total of `/proc/loadavg`'s `running/total` field.
fn parse_tasks(loadavg: &str) -> Option<u64> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// The soft "Max open files" of `/proc/self/limits`.
fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The bounds on how many jobs a host carries, the tightest first.
/// `slots` and `slots_bound` are the configuration's (usable id ranges,
/// and the pool that bounds them); `running` the sandboxes holding a slot
/// now. A host bound counts the running ones plus what the rest of the
/// resource holds at an idle job's cost:
///
/// ```text
/// memory    = running + MemAvailable / IDLE_JOB_BYTES
/// tasks     = running + (min(pid_max, threads-max) - tasks now) / IDLE_JOB_TASKS
/// agent_fds = running + (RLIMIT_NOFILE - fds open) / AGENT_FDS_PER_JOB
/// ```
pub fn bounds(slots: u64, slots_bound: &str, running: u64, host: &Host) -> Vec<Bound> {
    let mut out = vec![Bound {
        name: "slots".into(),
        jobs: slots,
        detail: format!(
            "{slots} usable id ranges, each with a /30 and a port block: bound by {slots_bound}"
        ),
    }];
    if let Some(avail) = host.mem_available {
        out.push(Bound {
            name: "memory".into(),
            jobs: running + avail / IDLE_JOB_BYTES,
            detail: format!(
                "{} MiB available; an idle job takes about {} MiB",
                avail >> 20,
                IDLE_JOB_BYTES >> 20
            ),
        });
    }
    if let (Some(max), Some(now)) = (host.tasks_max, host.tasks) {
        out.push(Bound {
            name: "tasks".into(),
            jobs: running + max.saturating_sub(now) / IDLE_JOB_TASKS,
            detail: format!(
                "{now} of {max} tasks (kernel.pid_max, kernel.threads-max) in use; an idle job runs about {IDLE_JOB_TASKS}; raise with sysctl -w kernel.pid_max=4194304"
            ),
        });
    }
    if let (Some(max), Some(now)) = (host.fds_max, host.fds) {
        out.push(Bound {
            name: "agent_fds".into(),
            jobs: running + max.saturating_sub(now) / AGENT_FDS_PER_JOB,
            detail: format!(
                "{now} of {max} descriptors open; the agent holds about {AGENT_FDS_PER_JOB} per job; raise LimitNOFILE= in its unit"
            ),
        });
    }
    out.sort_by_key(|b| b.jobs);
    out
}

impl Jobs {
    pub fn capacity(&self) -> Capacity {
        let cfg = self.engine.config();
        let free_ranges = self.engine.free_slots();
        let warm_ready = self.pooled();
        let shutting_down = self.closing.load(std::sync::atomic::Ordering::SeqCst);
        let free = free_ranges + warm_ready;
        let usable = self.engine.usable_slots();
        let host = Host::read(&cfg.proc_root);
        Capacity {
            accepting: !shutting_down && free > 0,
            free,
            free_ranges,
            uid_ranges: cfg.uid_ranges as usize,
            warm_ready,
            warm_pool: self.pool_size,
            jobs: self.list().len(),
            memory_available_bytes: host.mem_available.unwrap_or(0),
            job_memory_bytes: cfg.default_limits.memory_bytes,
            shutting_down,
            bounds: bounds(
                usable as u64,
                cfg.slots_bound(),
                usable.saturating_sub(free_ranges) as u64,
                &host,
            ),
            limits: limits(&cfg.proc_root),
        }
    }
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

    #[test]
    fn reads_tasks_and_the_descriptor_bound() {
        assert_eq!(parse_tasks("10.09 6.28 3.53 12/478 9601\n"), Some(478));
        assert_eq!(parse_tasks("0.00 0.00\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95913                95913                processes \n\
                      Max open files            20000                524288               files     \n";
        assert_eq!(parse_nofile(limits), Some(20000));
        assert_eq!(
            parse_nofile("Max open files  unlimited unlimited files\n"),
            None
        );
    }

    #[test]
    fn the_tightest_bound_comes_first_and_counts_running_jobs() {
        let host = Host {
            mem_available: Some(10 * IDLE_JOB_BYTES + 5),
            tasks_max: Some(32768),
            tasks: Some(32768 - 3 * IDLE_JOB_TASKS),
            fds: Some(100),
            fds_max: Some(100 + 1000 * AGENT_FDS_PER_JOB),
        };
        let b = bounds(512, "uid_ranges", 4, &host);
        let got: Vec<(&str, u64)> = b.iter().map(|b| (b.name.as_str(), b.jobs)).collect();
        assert_eq!(
            got,
            [
                ("tasks", 7),
                ("memory", 14),
                ("slots", 512),
                ("agent_fds", 1004)
            ]
        );
        assert!(b[0].detail.contains("kernel.pid_max"), "{}", b[0].detail);
        // More in use than the bound: no room, not an underflow.
        let over = Host {
            tasks: Some(40000),
            ..host
        };
        assert_eq!(bounds(512, "uid_ranges", 4, &over)[0].jobs, 4);
        // What cannot be read bounds nothing.
        let unknown = bounds(8, "net_pool_prefix", 0, &Host::default());
        assert_eq!(unknown.len(), 1);
        assert!(unknown[0].detail.contains("net_pool_prefix"));
    }

    #[test]
    fn limits_are_read_from_proc_and_keys_say_how_many_containers() {
        let root = std::env::temp_dir().join(format!("berth-limits-{}", std::process::id()));
        let write = |p: &str, v: &str| {
            let f = root.join("sys").join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, v).unwrap();
        };
        write("fs/inotify/max_user_instances", "128\n");
        write("kernel/keys/maxkeys", "200\n");
        write("kernel/keys/maxbytes", "7000\n");
        write("net/netfilter/nf_conntrack_max", "262144\n");
        write("net/netfilter/nf_conntrack_count", "17\n");
        let l = limits(&root);
        let _ = std::fs::remove_dir_all(&root);
        let names: Vec<&str> = l.iter().map(|l| l.name.as_str()).collect();
        // Watches unreadable: left out.
        assert_eq!(
            names,
            ["inotify_instances", "keys", "key_bytes", "conntrack"]
        );
        // 7000 bytes / 70 a keyring bounds it before 200 keys do.
        assert!(
            l[1].detail.contains("about 100 containers"),
            "{}",
            l[1].detail
        );
        assert_eq!((l[3].max, l[3].in_use), (262144, Some(17)));
        assert!(l[3].detail.contains("(17 in use)"), "{}", l[3].detail);
        // Nothing readable, nothing named.
        assert!(limits(Path::new("/nonexistent")).is_empty());
    }
}
