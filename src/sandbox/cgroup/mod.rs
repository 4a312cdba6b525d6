//! Host cgroups of a job, on v1 (one directory per hierarchy) and v2.
//!
//! Shape (docs/sandbox.md, "cgroups"): limits sit on a root-owned
//! `<home>/<parent>/<job>` directory; only its child `…/<job>/job` is handed
//! to the job's root, and the job's cgroup namespace is rooted there. The job
//! can subdivide its own share but never raise the limits above it. On v2 the
//! home is the agent's own (delegated) cgroup; on v1 the hierarchies' roots.

pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::Limits;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot write {path}: {source} (is the cgroup filesystem writable by the agent? \
         berth needs root and a read-write /sys/fs/cgroup)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cgroup hierarchy is mounted under {0}; mount cgroup2 (or the v1 hierarchies) there"
    )]
    NoHierarchy(PathBuf),
    #[error("cgroup {path} still has processes after {waited:?}: {left}")]
    Busy {
        path: PathBuf,
        waited: Duration,
        /// What is left, e.g. "2 tasks (1234 in D state: uninterruptible)".
        left: String,
    },
    #[error("cannot tell the agent's own cgroup from {path}: {why}")]
    OwnCgroup { path: PathBuf, why: String },
    #[error(
        "the agent's cgroup {path} is managed by systemd but not delegated to it: run berth as \
         the shipped berth.service (Delegate=yes), or start it with \
         `systemd-run --scope -p Delegate=yes berth …` (the berth command does this by itself)"
    )]
    NotDelegated { path: PathBuf },
    #[error("cannot enable the {controllers} controller(s) in {path}: {source}{hint}")]
    Controllers {
        path: PathBuf,
        controllers: String,
        source: std::io::Error,
        hint: &'static str,
    },
}

/// One mounted v1 hierarchy, e.g. `/sys/fs/cgroup/cpu,cpuacct` with
/// controllers `["cpu", "cpuacct"]`, or the named `name=systemd`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hierarchy {
    pub mount: PathBuf,
    pub controllers: Vec<String>,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
    /// Mount options that re-mount this hierarchy inside the job.
    pub fn mount_options(&self) -> String {
        if self.controllers.iter().all(|c| c.starts_with("name=")) {
            format!("none,{}", self.controllers.join(","))
        } else {
            self.controllers.join(",")
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum Layout {
    V1 {
        hierarchies: Vec<Hierarchy>,
    },
    V2 {
        mount: PathBuf,
        /// The cgroup jobs are placed below, relative to `mount`: the
        /// agent's own delegated cgroup (empty for the root). Filled in by
        /// [`prepare`].
        #[serde(default)]
        home: PathBuf,
    },
}

impl Layout {
    /// "v1, N hierarchies" or "v2 below /home".
    pub fn describe(&self) -> String {
        match self {
            Layout::V1 { hierarchies } => format!("v1, {} hierarchies", hierarchies.len()),
            Layout::V2 { home, .. } => format!("v2, jobs below /{}", home.display()),
        }
    }
}

/// Reads the cgroup layout under `root` from mountinfo text. A v2 layout
/// comes back with an empty home: [`prepare`] finds it.
///
/// Only mounts that can be seen count: in a container given the host's
/// `/sys` or `/sys/fs/cgroup` as a volume, the runtime's own read-only
/// hierarchies stay listed beneath the volume at the same paths.
pub fn detect(mountinfo: &str, root: &Path) -> Result<Layout, CgroupError> {
    let mounts: Vec<Mount<'_>> = mountinfo.lines().filter_map(Mount::parse).collect();
    let mut v1 = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        if !visible(&mounts, i) {
            continue;
        }
        let (mount, fstype, options) = (m.point.clone(), m.fstype, m.options);
        if fstype == "cgroup2" && mount == root {
            return Ok(Layout::V2 {
                mount,
                home: PathBuf::new(),
            });
        }
        if fstype == "cgroup" && mount.parent() == Some(root) {
            let controllers: Vec<String> = options
                .split(',')
                .filter(|o| {
                    !matches!(
                        *o,
                        "rw" | "ro" | "xattr" | "noprefix" | "clone_children" | "cpuset_v2_mode"
                    ) && !o.starts_with("release_agent=")
                })
                .map(str::to_string)
                .collect();
            if !controllers.is_empty() {
                v1.push(Hierarchy { mount, controllers });
            }
        }
    }
    if v1.is_empty() {
        return Err(CgroupError::NoHierarchy(root.into()));
    }
    Ok(Layout::V1 { hierarchies: v1 })
}

/// One line of mountinfo, as far as visibility and cgroups need it.
struct Mount<'a> {
    id: &'a str,
    parent: &'a str,
    point: PathBuf,
    fstype: &'a str,
    options: &'a str,
}

impl<'a> Mount<'a> {
    fn parse(line: &'a str) -> Option<Mount<'a>> {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            return None;
        }
        Some(Mount {
            id: pre[0],
            parent: pre[1],
            point: PathBuf::from(unescape(pre[4])),
            fstype: post[0],
            options: post[2],
        })
    }
}

/// Whether `mounts[i]` can be seen at its path: neither it nor any mount it
/// sits on has another mount on top (at the same path, on it) or over it (a
/// sibling at a path above it). Mount ids, not the lines' order, tell what
/// sits on what: mountinfo does not list a parent before its children.
fn visible(mounts: &[Mount<'_>], i: usize) -> bool {
    let mut below: Option<&str> = None;
    let mut m = &mounts[i];
    for _ in 0..mounts.len() {
        let covered = mounts.iter().any(|n| {
            (n.parent == m.id && n.point == m.point && Some(n.id) != below)
                || (n.parent == m.parent && n.point != m.point && m.point.starts_with(&n.point))
        });
        if covered {
            return false;
        }
        match mounts.iter().find(|p| p.id == m.parent && p.id != m.id) {
            Some(p) => {
                below = Some(m.id);
                m = p;
            }
            None => return true,
        }
    }
    true
}

/// What [`prepare`] needs to know about the host.
pub struct Host<'a> {
    /// procfs (`/proc/self/cgroup` tells the agent's own cgroup).
    pub proc_root: &'a Path,
    /// Whether systemd manages this host's cgroups (`/run/systemd/system`).
    pub systemd: bool,
}

impl Host<'_> {
    pub fn systemd_booted() -> bool {
        Path::new("/run/systemd/system").is_dir()
    }
}

/// Makes `layout` ready for jobs below `parent`: on v2 finds the agent's
/// home, moves the agent into a leaf of it and hands the controllers down;
/// on v1 creates the parent in every hierarchy. Proves delegation: any
/// error means jobs cannot get cgroups here.
pub fn prepare(layout: Layout, host: &Host<'_>, parent: &str) -> Result<Layout, CgroupError> {
    match layout {
        Layout::V1 { hierarchies } => {
            v1::prepare(&hierarchies, parent)?;
            Ok(Layout::V1 { hierarchies })
        }
        Layout::V2 { mount, .. } => {
            let home = v2::prepare(&mount, host, parent)?;
            Ok(Layout::V2 { mount, home })
        }
    }
}

/// Proves that jobs can get cgroups here, by doing what a job start does:
/// prepares `layout` (on v2: the agent's home taken over, controllers handed
/// down), creates a throwaway job cgroup with limits, moves a process into
/// its delegated child and (v2) its leaf, checks where the process landed,
/// and removes it all. Returns what was proven.
pub fn prove_delegation(
    layout: Layout,
    host: &Host<'_>,
    parent: &str,
) -> Result<String, CgroupError> {
    let layout = prepare(layout, host, parent)?;
    let id = format!("doctor-{}", std::process::id());
    let cg = JobCgroup::new(layout.clone(), parent, &id);
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        pids: Some(64),
        cpus: Some(0.5),
        disk_bytes: None,
    };
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| CgroupError::Write {
            path: "sleep".into(),
            source,
        })?;
    let pid = child.id();
    let proven = (|| {
        cg.create(&limits, 0, 0)?;
        cg.attach(pid)?;
        cg.settle(pid)?;
        let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let now = read(&file)?;
        let want = match &layout {
            Layout::V1 { .. } => cg.rel.join(DELEGATED),
            Layout::V2 { .. } => cg.rel.join(DELEGATED).join(INIT_LEAF),
        };
        let want = format!("/{}", want.display());
        if !now.lines().any(|l| l.ends_with(&format!(":{want}"))) {
            return Err(CgroupError::OwnCgroup {
                path: file,
                why: format!("a process moved into {want} is elsewhere: {}", now.trim()),
            });
        }
        Ok(format!(
            "{}: created a job cgroup with limits, moved a process into {want}",
            layout.describe()
        ))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let cleaned = cg
        .kill_all(Duration::from_secs(5))
        .and_then(|()| cg.remove());
    let proven = proven?;
    cleaned?;
    Ok(proven)
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.into(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Write {
            path: path.into(),
            source,
        }),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), CgroupError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| CgroupError::Write {
        path: path.into(),
        source,
    })
}

/// The cgroups of one job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobCgroup {
    pub layout: Layout,
    /// `<home>/<parent>/<job id>`, relative to each hierarchy's root.
    pub rel: PathBuf,
}

/// Name of the delegated child below the job's limit cgroup.
pub const DELEGATED: &str = "job";

/// v2: the leaf below the delegated child that holds the job's stage-1
/// helper, its init and dockerd, so that the delegated child itself holds no
/// process and can enable controllers for the containers (cgroup v2's
/// no-internal-process rule). Inside the job it is `/init`.
pub const INIT_LEAF: &str = "init";

impl JobCgroup {
    pub fn new(layout: Layout, parent: &str, job_id: &str) -> Self {
        let home = match &layout {
            Layout::V1 { .. } => PathBuf::new(),
            Layout::V2 { home, .. } => home.clone(),
        };
        JobCgroup {
            layout,
            rel: home.join(parent).join(job_id),
        }
    }

    /// Every directory that holds this job's limits (one per hierarchy).
    pub fn limit_dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .map(|h| h.mount.join(&self.rel))
                .collect(),
            Layout::V2 { mount, .. } => vec![mount.join(&self.rel)],
        }
    }

    /// Every directory the job's processes are placed in.
    pub fn delegated_dirs(&self) -> Vec<PathBuf> {
        self.limit_dirs()
            .into_iter()
            .map(|d| d.join(DELEGATED))
            .collect()
    }

    /// Creates the limit cgroup and its delegated child owned by the job's
    /// root (`uid`/`gid` on the host).
    pub fn create(&self, limits: &Limits, uid: u32, gid: u32) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V1 { hierarchies } => v1::create(hierarchies, &self.rel, limits, uid, gid),
            Layout::V2 { mount, .. } => v2::create(&mount.join(&self.rel), limits, uid, gid),
        }
    }

    /// Moves `pid` (the job's stage-1 helper, before it creates the job's
    /// cgroup namespace) into the delegated child of every hierarchy.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for d in self.delegated_dirs() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves `pid` (the stage-1 helper, after it created the job's cgroup
    /// namespace and before it forks the job's init) into its final place:
    /// on v2 the `init` leaf, on v1 where it already is.
    pub fn settle(&self, pid: u32) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V1 { .. } => Ok(()),
            Layout::V2 { mount, .. } => write(
                &mount
                    .join(&self.rel)
                    .join(DELEGATED)
                    .join(INIT_LEAF)
                    .join("cgroup.procs"),
                &pid.to_string(),
            ),
        }
    }

    /// All pids anywhere in the job's subtree (read from one hierarchy: every
    /// process is in every hierarchy).
    pub fn pids(&self) -> Vec<u32> {
        let Some(top) = self.limit_dirs().into_iter().find(|d| d.exists()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        walk(&top, &mut |d| {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        });
        out
    }

    /// SIGKILLs every process of the job until the subtree is empty, whatever
    /// state the job left it in. v2: `cgroup.kill` takes the whole subtree at
    /// once, forkers and frozen tasks included. v1: the subtree is frozen
    /// first (no fork escapes the sweep), every task is sent SIGKILL, then
    /// every freezer below is thawed, the job's own `docker pause`s included:
    /// a frozen v1 task keeps a pending SIGKILL until it is thawed.
    /// Tasks that stay (uninterruptible sleep) make it fail after `timeout`.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        let freezer = self.freezer_dir();
        match (&self.layout, &freezer) {
            (Layout::V2 { mount, .. }, _) => {
                // cgroup.kill needs 5.14; older kernels get the sweep below.
                let _ = std::fs::write(mount.join(&self.rel).join("cgroup.kill"), "1");
            }
            (Layout::V1 { .. }, Some(top)) => {
                let _ = std::fs::write(top.join("freezer.state"), "FROZEN");
            }
            (Layout::V1 { .. }, None) => {}
        }
        let mut pause = Duration::from_millis(1);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy {
                    path: self.limit_dirs()[0].clone(),
                    waited: timeout,
                    left: describe_tasks(&pids),
                });
            }
            for p in pids {
                let _ = super::sys::kill(p as i32, nix::sys::signal::Signal::SIGKILL);
            }
            if let Some(top) = &freezer {
                // Parents first (walk's order): a child thawed below a
                // frozen parent would stay frozen.
                walk(top, &mut |d| {
                    let _ = std::fs::write(d.join("freezer.state"), "THAWED");
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The job's directory in the v1 freezer hierarchy, if there is one.
    fn freezer_dir(&self) -> Option<PathBuf> {
        match &self.layout {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .find(|h| h.has("freezer"))
                .map(|h| h.mount.join(&self.rel))
                .filter(|d| d.exists()),
            Layout::V2 { .. } => None,
        }
    }

    /// Removes the job's cgroups (children first) in every hierarchy.
    /// Idempotent; the shared parent stays.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for top in self.limit_dirs() {
            if !top.exists() {
                continue;
            }
            let mut dirs = Vec::new();
            walk(&top, &mut |d| dirs.push(d.to_path_buf()));
            // Deepest first.
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let mut tries = 0;
                loop {
                    match std::fs::remove_dir(&d) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        // EBUSY while the last zombies are reaped.
                        Err(_) if tries < 200 => {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(source) => return Err(CgroupError::Write { path: d, source }),
                    }
                }
            }
        }
        Ok(())
    }

    /// What the job's processes used, all of its subtree counted: CPU time
    /// and the memory high-water mark. Read after the job's last process
    /// has died, it is the job's whole use. None for CPU where the
    /// accounting file cannot be read; the peak is None on v2 kernels
    /// before 5.19 (no `memory.peak`).
    pub fn usage(&self) -> Option<Usage> {
        match &self.layout {
            Layout::V1 { hierarchies } => {
                let dir = |c: &str| {
                    hierarchies
                        .iter()
                        .find(|h| h.has(c))
                        .map(|h| h.mount.join(&self.rel))
                };
                let cpu_ns: u64 = read_number(&dir("cpuacct")?.join("cpuacct.usage"))?;
                Some(Usage {
                    cpu: Duration::from_nanos(cpu_ns),
                    memory_peak: dir("memory")
                        .and_then(|d| read_number(&d.join("memory.max_usage_in_bytes"))),
                })
            }
            Layout::V2 { mount, .. } => {
                let dir = mount.join(&self.rel);
                let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
                Some(Usage {
                    cpu: Duration::from_micros(v2::usage_usec(&stat)?),
                    memory_peak: read_number(&dir.join("memory.peak")),
                })
            }
        }
    }

    /// Current process limit of the job (for tests and reports).
    pub fn pids_limit(&self) -> Option<u64> {
        let dir = match &self.layout {
            Layout::V1 { hierarchies } => hierarchies.iter().find(|h| h.has("pids"))?.mount.clone(),
            Layout::V2 { mount, .. } => mount.clone(),
        };
        read_number(&dir.join(&self.rel).join("pids.max"))
    }

    /// Current memory limit of the job (for tests and reports).
    pub fn memory_limit(&self) -> Option<u64> {
        let file = match &self.layout {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .find(|h| h.has("memory"))?
                .mount
                .join(&self.rel)
                .join("memory.limit_in_bytes"),
            Layout::V2 { mount, .. } => mount.join(&self.rel).join("memory.max"),
        };
        read_number(&file)
    }
}

/// What a job used, from its cgroups ([`JobCgroup::usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of all its processes, user and system.
    pub cpu: Duration,
    /// The most memory it held at once (bytes), page cache included.
    pub memory_peak: Option<u64>,
}

/// A cgroup file that holds one number.
fn read_number(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// "3 tasks: 1234 D (uninterruptible sleep), 1240 Z (zombie), 1251 S".
fn describe_tasks(pids: &[u32]) -> String {
    let shown: Vec<String> = pids
        .iter()
        .take(5)
        .map(|p| {
            let state = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1;
                    after.split_whitespace().next().map(str::to_string)
                })
                .unwrap_or_else(|| "?".into());
            let what = match state.as_str() {
                "D" => " (uninterruptible sleep)",
                "Z" => " (zombie)",
                "T" | "t" => " (stopped)",
                _ => "",
            };
            format!("{p} {state}{what}")
        })
        .collect();
    let more = if pids.len() > shown.len() {
        ", …"
    } else {
        ""
    };
    format!("{} task(s): {}{more}", pids.len(), shown.join(", "))
}

fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * 100_000.0).round() as u64).max(1000)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/other rw - cgroup cgroup rw,pids";

    #[test]
    fn detects_v1_hierarchies_under_root_only() {
        let l = detect(HYBRID, Path::new("/sys/fs/cgroup")).unwrap();
        let Layout::V1 { hierarchies } = l else {
            panic!("expected v1")
        };
        assert_eq!(hierarchies.len(), 3);
        assert_eq!(hierarchies[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(hierarchies[0].mount_options(), "cpu,cpuacct");
        assert_eq!(hierarchies[2].mount_options(), "none,name=systemd");
    }

    /// A container with `-v /sys:/sys` on a v1 host: the runtime's own
    /// read-only hierarchies (rooted at the container's cgroup) are still
    /// listed, beneath the host's sysfs and its cgroup mounts.
    const CONTAINER_WITH_HOST_SYS: &str = "\
79 70 0:50 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs rw
81 79 0:44 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755
82 81 0:29 /docker/0864 /sys/fs/cgroup/cpu ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
85 81 0:32 /docker/0864 /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory
90 81 0:37 /docker/0864 /sys/fs/cgroup/systemd ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,name=systemd
91 79 0:22 / /sys rw,relatime - sysfs sysfs rw
92 91 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
94 92 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
97 92 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
103 92 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
104 92 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn hierarchies_covered_by_a_later_mount_do_not_count() {
        let Layout::V1 { hierarchies } =
            detect(CONTAINER_WITH_HOST_SYS, Path::new("/sys/fs/cgroup")).unwrap()
        else {
            panic!("expected v1")
        };
        let mounts: Vec<_> = hierarchies.iter().map(|h| h.mount.clone()).collect();
        assert_eq!(
            mounts,
            ["cpu", "memory", "systemd"].map(|c| PathBuf::from("/sys/fs/cgroup").join(c))
        );
        // A bind of the host's cgroup2 over the runtime's read-only one.
        let v2 = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw,nsdelegate
31 30 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert!(matches!(
            detect(v2, Path::new("/sys/fs/cgroup")),
            Ok(Layout::V2 { .. })
        ));
    }

    #[test]
    fn detects_v2() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            detect(mi, Path::new("/sys/fs/cgroup")).unwrap(),
            Layout::V2 {
                mount: "/sys/fs/cgroup".into(),
                home: PathBuf::new(),
            }
        );
        assert!(matches!(
            detect("", Path::new("/sys/fs/cgroup")),
            Err(CgroupError::NoHierarchy(_))
        ));
    }

    #[test]
    fn records_written_before_homes_still_load() {
        let old = r#"{"layout":{"version":"v2","mount":"/sys/fs/cgroup"},"rel":"berth/j1"}"#;
        let cg: JobCgroup = serde_json::from_str(old).unwrap();
        assert_eq!(
            cg.limit_dirs(),
            vec![PathBuf::from("/sys/fs/cgroup/berth/j1")]
        );
    }

    #[test]
    fn v2_jobs_live_below_the_home() {
        let cg = JobCgroup::new(
            Layout::V2 {
                mount: "/sys/fs/cgroup".into(),
                home: "system.slice/berth.service".into(),
            },
            "berth",
            "j1",
        );
        assert_eq!(
            cg.delegated_dirs(),
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/berth.service/berth/j1/job"
            )]
        );
    }
}
