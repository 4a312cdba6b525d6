//! Host cgroups of a job, on v1 (one directory per hierarchy) and v2.
//!
//! Shape (DESIGN.md, "delegated cgroups"): limits sit on a root-owned
//! `<parent>/<job>` directory; only its child `<parent>/<job>/job` is handed to
//! the job's root, and the job's cgroup namespace is rooted there. The job can
//! subdivide its own share but never raise the limits above it.

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
    #[error("cgroup {path} still has processes after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
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
    V1 { hierarchies: Vec<Hierarchy> },
    V2 { mount: PathBuf },
}

/// Reads the cgroup layout under `root` from mountinfo text.
pub fn detect(mountinfo: &str, root: &Path) -> Result<Layout, CgroupError> {
    let mut v1 = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let mount = PathBuf::from(unescape(pre[4]));
        let fstype = post[0];
        if fstype == "cgroup2" && mount == root {
            return Ok(Layout::V2 { mount });
        }
        if fstype == "cgroup" && mount.parent() == Some(root) {
            let controllers: Vec<String> = post[2]
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

/// cpuset refuses tasks until `cpus` and `mems` are set: copy them down.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        if read(&dir.join(f))?.trim().is_empty() {
            write(&dir.join(f), read(&parent.join(f))?.trim())?;
        }
    }
    Ok(())
}

/// The cgroups of one job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobCgroup {
    pub layout: Layout,
    /// `<parent>/<job id>`, relative to each hierarchy's root.
    pub rel: PathBuf,
}

/// Name of the delegated child below the job's limit cgroup.
pub const DELEGATED: &str = "job";

impl JobCgroup {
    pub fn new(layout: Layout, parent: &str, job_id: &str) -> Self {
        JobCgroup {
            layout,
            rel: Path::new(parent).join(job_id),
        }
    }

    /// Every directory that holds this job's limits (one per hierarchy).
    pub fn limit_dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .map(|h| h.mount.join(&self.rel))
                .collect(),
            Layout::V2 { mount } => vec![mount.join(&self.rel)],
        }
    }

    /// Every directory the job's processes are placed in.
    pub fn delegated_dirs(&self) -> Vec<PathBuf> {
        self.limit_dirs()
            .into_iter()
            .map(|d| d.join(DELEGATED))
            .collect()
    }

    /// Checks that the agent can create cgroups under `parent` in every
    /// hierarchy. Creates `parent` (shared by all jobs) when missing.
    pub fn probe(layout: &Layout, parent: &str) -> Result<(), CgroupError> {
        match layout {
            Layout::V1 { hierarchies } => {
                for h in hierarchies {
                    let mut dir = h.mount.clone();
                    for comp in Path::new(parent).components() {
                        dir.push(comp);
                        mkdir(&dir)?;
                        if h.has("cpuset") {
                            inherit_cpuset(&dir)?;
                        }
                    }
                }
            }
            Layout::V2 { mount } => {
                let mut dir = mount.clone();
                enable_v2_controllers(&dir)?;
                for comp in Path::new(parent).components() {
                    dir.push(comp);
                    mkdir(&dir)?;
                    enable_v2_controllers(&dir)?;
                }
            }
        }
        Ok(())
    }

    /// Creates the limit cgroup and its delegated child owned by the job's
    /// root (`uid`/`gid` on the host).
    pub fn create(&self, limits: &Limits, uid: u32, gid: u32) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V1 { hierarchies } => {
                for h in hierarchies {
                    let dir = h.mount.join(&self.rel);
                    mkdir(&dir)?;
                    let child = dir.join(DELEGATED);
                    mkdir(&child)?;
                    if h.has("cpuset") {
                        inherit_cpuset(&dir)?;
                        inherit_cpuset(&child)?;
                    }
                    if h.has("memory")
                        && let Some(m) = limits.memory_bytes
                    {
                        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                    }
                    if h.has("pids")
                        && let Some(p) = limits.pids
                    {
                        write(&dir.join("pids.max"), &p.to_string())?;
                    }
                    if h.has("cpu")
                        && let Some(c) = limits.cpus
                    {
                        write(&dir.join("cpu.cfs_period_us"), "100000")?;
                        write(&dir.join("cpu.cfs_quota_us"), &cpu_quota(c).to_string())?;
                    }
                    for f in ["", "cgroup.procs", "tasks"] {
                        chown(&child.join(f), uid, gid)?;
                    }
                }
            }
            Layout::V2 { mount } => {
                let dir = mount.join(&self.rel);
                mkdir(&dir)?;
                if let Some(m) = limits.memory_bytes {
                    write(&dir.join("memory.max"), &m.to_string())?;
                }
                if let Some(p) = limits.pids {
                    write(&dir.join("pids.max"), &p.to_string())?;
                }
                if let Some(c) = limits.cpus {
                    write(&dir.join("cpu.max"), &format!("{} 100000", cpu_quota(c)))?;
                }
                enable_v2_controllers(&dir)?;
                let child = dir.join(DELEGATED);
                mkdir(&child)?;
                for f in [
                    "",
                    "cgroup.procs",
                    "cgroup.threads",
                    "cgroup.subtree_control",
                ] {
                    chown(&child.join(f), uid, gid)?;
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into the delegated child of every hierarchy.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for d in self.delegated_dirs() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
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

    /// SIGKILLs every process of the job until the subtree is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        if let Layout::V2 { mount } = &self.layout {
            // cgroup.kill (5.14+) kills the subtree atomically, even forkers.
            let _ = std::fs::write(mount.join(&self.rel).join("cgroup.kill"), "1");
        }
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy {
                    path: self.limit_dirs()[0].clone(),
                    waited: timeout,
                });
            }
            for p in pids {
                let _ = super::sys::kill(p as i32, nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
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

    /// Current memory limit of the job (for tests and reports).
    pub fn memory_limit(&self) -> Option<u64> {
        let file = match &self.layout {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .find(|h| h.has("memory"))?
                .mount
                .join(&self.rel)
                .join("memory.limit_in_bytes"),
            Layout::V2 { mount } => mount.join(&self.rel).join("memory.max"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }
}

fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * 100_000.0).round() as u64).max(1000)
}

fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let enabled = read(&dir.join("cgroup.subtree_control"))?;
    let want: Vec<String> = available
        .split_whitespace()
        .filter(|c| matches!(*c, "cpu" | "cpuset" | "memory" | "pids" | "io"))
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if !want.is_empty() {
        write(&dir.join("cgroup.subtree_control"), &want.join(" "))?;
    }
    Ok(())
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

    #[test]
    fn detects_v2() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            detect(mi, Path::new("/sys/fs/cgroup")).unwrap(),
            Layout::V2 {
                mount: "/sys/fs/cgroup".into()
            }
        );
        assert!(matches!(
            detect("", Path::new("/sys/fs/cgroup")),
            Err(CgroupError::NoHierarchy(_))
        ));
    }

    #[test]
    fn v2_create_writes_limits_on_parent_and_delegates_child() {
        // A plain directory stands in for cgroupfs: the logic is the same.
        let root = std::env::temp_dir().join(format!("berth-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("berth")).unwrap();
        for d in [root.clone(), root.join("berth")] {
            std::fs::write(d.join("cgroup.controllers"), "cpu memory pids").unwrap();
            std::fs::write(d.join("cgroup.subtree_control"), "").unwrap();
        }
        let cg = JobCgroup::new(
            Layout::V2 {
                mount: root.clone(),
            },
            "berth",
            "j1",
        );
        let job = root.join("berth/j1");
        std::fs::create_dir_all(job.join(DELEGATED)).unwrap();
        std::fs::write(job.join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(job.join("cgroup.subtree_control"), "").unwrap();
        for f in ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"] {
            std::fs::write(job.join(DELEGATED).join(f), "").unwrap();
        }
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            pids: Some(100),
            cpus: Some(1.5),
        };
        cg.create(&limits, 1234, 5678).unwrap();
        assert_eq!(
            std::fs::read_to_string(job.join("memory.max")).unwrap(),
            "1073741824"
        );
        assert_eq!(
            std::fs::read_to_string(job.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(job.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(job.join(DELEGATED).join("cgroup.procs")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        // The limit files stay root-owned: the job cannot raise them.
        assert_eq!(std::fs::metadata(job.join("memory.max")).unwrap().uid(), 0);
        assert_eq!(cg.memory_limit(), Some(1 << 30));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
