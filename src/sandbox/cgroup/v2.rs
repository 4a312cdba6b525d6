//! cgroup v2: one tree. Jobs live below the agent's own cgroup, its *home*:
//! under systemd the delegated cgroup of berth.service (or of a delegated
//! scope), in a container the root of its cgroup namespace, elsewhere the
//! cgroup the agent was started in. Only leaves may hold processes once a
//! cgroup hands controllers down, so the agent moves itself (and anything
//! else in its home) into the leaf `agent`, and each job's processes into the
//! leaf `job/init`.

use std::path::{Path, PathBuf};

use super::{CgroupError, DELEGATED, Host, INIT_LEAF, chown, cpu_quota, mkdir, read, write};
use crate::sandbox::config::Limits;

/// The leaf of the home that holds the agent's own processes.
pub const AGENT_LEAF: &str = "agent";

/// Controllers jobs need: limits on the whole job, and `--memory`,
/// `--cpus`, `--pids-limit`, `--cpuset-cpus`, `--blkio-weight` for its
/// containers. The first three are required.
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];
const OPTIONAL: [&str; 2] = ["cpuset", "io"];

/// The agent's own cgroup, relative to the v2 mount, from the text of
/// `/proc/self/cgroup` (the `0::/path` line).
pub fn own_cgroup(proc_self_cgroup: &str) -> Option<PathBuf> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    Some(PathBuf::from(path.trim_start_matches('/')))
}

/// The home for an agent whose cgroup is `own`: that cgroup, or its parent
/// when the agent already sits in the home's leaf (a second engine in the
/// same process, or a restart inside the same scope).
pub fn home_of(own: &Path) -> PathBuf {
    if own.file_name().is_some_and(|n| n == AGENT_LEAF) {
        own.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        own.to_path_buf()
    }
}

/// Whether systemd delegated `dir`. Current systemd marks delegated
/// cgroups with the `trusted.delegate` (or, for a user's manager,
/// `user.delegate`) extended attribute; older ones do not, so without the
/// mark systemd is asked for the unit's own `Delegate=` setting.
pub fn delegated_by_systemd(dir: &Path) -> bool {
    let marked = ["trusted.delegate", "user.delegate"]
        .iter()
        .any(|name| crate::sandbox::sys::getxattr(dir, name).is_some_and(|v| v == b"1"));
    marked
        || unit_of(dir).is_some_and(|unit| {
            std::process::Command::new("systemctl")
                .args(["show", "--property=Delegate", "--value", unit])
                .output()
                .is_ok_and(|o| {
                    o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "yes"
                })
        })
}

/// The systemd unit whose cgroup `dir` is (a service or a scope).
fn unit_of(dir: &Path) -> Option<&str> {
    dir.file_name()?
        .to_str()
        .filter(|n| n.ends_with(".service") || n.ends_with(".scope"))
}

/// Marks a process that already asked systemd for a delegated scope, so it
/// never asks twice.
pub const SCOPE_MARK: &str = "BERTH_DELEGATED_SCOPE";

/// True when this process runs on a pure cgroup v2 host managed by systemd,
/// in a cgroup systemd did not delegate (a login session, a service without
/// `Delegate=yes`): an agent here must first get a delegated scope of its
/// own, or its jobs cannot get cgroups.
pub fn needs_delegated_scope(proc_root: &Path, cgroup_root: &Path) -> bool {
    if std::env::var_os(SCOPE_MARK).is_some() || !Host::systemd_booted() {
        return false;
    }
    let Ok(mountinfo) = std::fs::read_to_string(proc_root.join("self/mountinfo")) else {
        return false;
    };
    if !matches!(
        super::detect(&mountinfo, cgroup_root),
        Ok(super::Layout::V2 { .. })
    ) {
        return false;
    }
    let own = std::fs::read_to_string(proc_root.join("self/cgroup"))
        .ok()
        .and_then(|t| own_cgroup(&t));
    match own.map(|o| home_of(&o)) {
        Some(home) if !home.as_os_str().is_empty() => {
            !delegated_by_systemd(&cgroup_root.join(home))
        }
        _ => false,
    }
}

/// The root of the whole hierarchy has no `cgroup.type` and is exempt from
/// the no-internal-process rule; a cgroup namespace's root is not.
fn is_hierarchy_root(dir: &Path) -> bool {
    !dir.join("cgroup.type").exists()
}

/// Finds the agent's home, takes it over (its processes to the `agent`
/// leaf, controllers handed down) and creates `parent` below it. Returns the
/// home, relative to `mount`.
pub fn prepare(mount: &Path, host: &Host<'_>, parent: &str) -> Result<PathBuf, CgroupError> {
    let file = host.proc_root.join("self/cgroup");
    let own = own_cgroup(&read(&file)?).ok_or_else(|| CgroupError::OwnCgroup {
        path: file.clone(),
        why: "no cgroup v2 entry (0::/…)".into(),
    })?;
    let home = home_of(&own);
    let dir = mount.join(&home);
    // systemd owns every cgroup it did not delegate: controllers enabled or
    // cgroups created there are undone at its next reload.
    if host.systemd && !home.as_os_str().is_empty() && !delegated_by_systemd(&dir) {
        return Err(CgroupError::NotDelegated { path: dir });
    }
    if !is_hierarchy_root(&dir) {
        adopt(&dir)?;
    }
    enable_controllers(&dir)?;
    let mut d = dir;
    for comp in Path::new(parent).components() {
        d.push(comp);
        mkdir(&d)?;
        enable_controllers(&d)?;
    }
    Ok(home)
}

/// Moves every process of `dir` into its `agent` leaf.
fn adopt(dir: &Path) -> Result<(), CgroupError> {
    let leaf = dir.join(AGENT_LEAF);
    mkdir(&leaf)?;
    let procs = leaf.join("cgroup.procs");
    // Processes may fork while they are moved: go round until none is left.
    for _ in 0..100 {
        let pids: Vec<String> = read(&dir.join("cgroup.procs"))?
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            match std::fs::write(&procs, &pid) {
                Ok(()) => {}
                // Exited meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(source) => {
                    return Err(CgroupError::Write {
                        path: procs.clone(),
                        source,
                    });
                }
            }
        }
    }
    Err(CgroupError::Busy {
        path: dir.into(),
        waited: std::time::Duration::ZERO,
        left: "processes kept arriving while they were moved to the agent's leaf".into(),
    })
}

/// `usage_usec` of a `cpu.stat` (present with or without the cpu
/// controller).
pub fn usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

/// Hands the controllers jobs need down from `dir` to its children.
pub fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let available: Vec<&str> = available.split_whitespace().collect();
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| !available.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::Controllers {
            path: dir.into(),
            controllers: missing.join(", "),
            source: std::io::ErrorKind::NotFound.into(),
            hint: " (not available here: the parent cgroup does not hand them down; \
                    under systemd, Delegate=yes delegates them)",
        });
    }
    let enabled = read(&dir.join("cgroup.subtree_control"))?;
    let file = dir.join("cgroup.subtree_control");
    for c in REQUIRED.iter().chain(&OPTIONAL) {
        if !available.contains(c) || enabled.split_whitespace().any(|e| e == *c) {
            continue;
        }
        if let Err(source) = std::fs::write(&file, format!("+{c}")) {
            if OPTIONAL.contains(c) {
                tracing::warn!(controller = c, cgroup = %dir.display(), error = %source,
                    "optional controller not enabled");
                continue;
            }
            let busy = source.raw_os_error() == Some(libc::EBUSY);
            return Err(CgroupError::Controllers {
                path: dir.into(),
                controllers: (*c).to_string(),
                source,
                hint: if busy {
                    " (a process still sits in this cgroup, and cgroup v2 lets only leaves \
                     hold processes once controllers are handed down)"
                } else {
                    ""
                },
            });
        }
    }
    Ok(())
}

/// Creates a job's limit cgroup `dir`, its delegated child owned by the
/// job's root, and the root-owned `init` leaf below that child.
pub fn create(dir: &Path, limits: &Limits, uid: u32, gid: u32) -> Result<(), CgroupError> {
    mkdir(dir)?;
    if let Some(m) = limits.memory_bytes {
        write(&dir.join("memory.max"), &m.to_string())?;
    }
    if let Some(p) = limits.pids {
        write(&dir.join("pids.max"), &p.to_string())?;
    }
    if let Some(c) = limits.cpus {
        write(&dir.join("cpu.max"), &format!("{} 100000", cpu_quota(c)))?;
    }
    enable_controllers(dir)?;
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
    mkdir(&child.join(INIT_LEAF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_usage_is_read_from_cpu_stat_with_or_without_the_cpu_controller() {
        let with = "usage_usec 1523411\nuser_usec 1000000\nsystem_usec 523411\n\
                    nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n";
        assert_eq!(usage_usec(with), Some(1_523_411));
        let without = "usage_usec 42\nuser_usec 40\nsystem_usec 2\n";
        assert_eq!(usage_usec(without), Some(42));
        assert_eq!(usage_usec("user_usec 40\n"), None);
        assert_eq!(usage_usec("usage_usec x\n"), None);
    }

    /// A plain directory standing in for a cgroup: the logic is the same.
    fn fake_cgroup(dir: &Path, controllers: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        std::fs::write(dir.join("cgroup.threads"), "").unwrap();
        std::fs::write(dir.join("cgroup.type"), "domain").unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-cg2-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn own_cgroup_and_home() {
        assert_eq!(
            own_cgroup("0::/system.slice/berth.service\n"),
            Some(PathBuf::from("system.slice/berth.service"))
        );
        assert_eq!(own_cgroup("0::/\n"), Some(PathBuf::new()));
        assert_eq!(own_cgroup("12:memory:/x\n"), None);
        assert_eq!(
            home_of(Path::new("system.slice/berth.service/agent")),
            PathBuf::from("system.slice/berth.service")
        );
        assert_eq!(home_of(Path::new("agent")), PathBuf::new());
        assert_eq!(
            home_of(Path::new("system.slice/x.scope")),
            PathBuf::from("system.slice/x.scope")
        );
    }

    #[test]
    fn the_unit_of_a_cgroup_is_its_service_or_scope() {
        assert_eq!(
            unit_of(Path::new("/sys/fs/cgroup/system.slice/berth.service")),
            Some("berth.service")
        );
        assert_eq!(
            unit_of(Path::new("/sys/fs/cgroup/system.slice/run-r1.scope")),
            Some("run-r1.scope")
        );
        assert_eq!(unit_of(Path::new("/sys/fs/cgroup/system.slice")), None);
    }

    #[test]
    fn prepare_takes_the_agents_own_cgroup_as_home() {
        let root = tmp("home");
        let home = root.join("sys/fs/cgroup/system.slice/berth.service");
        fake_cgroup(&home, "cpu io memory pids");
        fake_cgroup(&home.join("agent"), "");
        fake_cgroup(&home.join("berth"), "cpu io memory pids");
        let proc_root = root.join("proc");
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        std::fs::write(
            proc_root.join("self/cgroup"),
            "0::/system.slice/berth.service\n",
        )
        .unwrap();
        let host = Host {
            proc_root: &proc_root,
            systemd: false,
        };
        let got = prepare(&root.join("sys/fs/cgroup"), &host, "berth").unwrap();
        assert_eq!(got, PathBuf::from("system.slice/berth.service"));
        // A plain file keeps only the last write: each controller goes alone.
        assert_eq!(
            std::fs::read_to_string(home.join("berth/cgroup.subtree_control")).unwrap(),
            "+io"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn under_systemd_an_undelegated_cgroup_is_refused_with_the_fix() {
        let root = tmp("undelegated");
        let home = root.join("cg/user.slice/session-1.scope");
        fake_cgroup(&home, "cpu memory pids");
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(
            root.join("proc/self/cgroup"),
            "0::/user.slice/session-1.scope\n",
        )
        .unwrap();
        let host = Host {
            proc_root: &root.join("proc"),
            systemd: true,
        };
        let e = prepare(&root.join("cg"), &host, "berth").unwrap_err();
        assert!(matches!(e, CgroupError::NotDelegated { .. }), "{e}");
        assert!(e.to_string().contains("Delegate=yes"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_required_controllers_are_named() {
        let root = tmp("missing");
        fake_cgroup(&root, "cpu io");
        let e = enable_controllers(&root).unwrap_err();
        assert!(e.to_string().contains("memory, pids"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn create_writes_limits_on_parent_and_delegates_child() {
        let root = tmp("create");
        let job = root.join("berth/j1");
        fake_cgroup(&job, "cpu memory pids");
        fake_cgroup(&job.join(DELEGATED), "");
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            pids: Some(100),
            cpus: Some(1.5),
            disk_bytes: None,
        };
        create(&job, &limits, 1234, 5678).unwrap();
        assert_eq!(
            std::fs::read_to_string(job.join("memory.max")).unwrap(),
            "1073741824"
        );
        assert_eq!(
            std::fs::read_to_string(job.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(job.join(DELEGATED).join("cgroup.procs")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        // The limit files and the init leaf stay root-owned: the job can
        // neither raise its limits nor move its monitor.
        assert_eq!(std::fs::metadata(job.join("memory.max")).unwrap().uid(), 0);
        let leaf = std::fs::metadata(job.join(DELEGATED).join(INIT_LEAF)).unwrap();
        assert!(leaf.is_dir());
        assert_eq!(leaf.uid(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
