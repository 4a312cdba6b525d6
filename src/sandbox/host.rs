//! Preparing the host for jobs, once, before any job starts: the whole
//! configuration and every prerequisite checked, the state dir created and
//! locked, cgroups delegated, forwarding on, the links' MTU and the DNS
//! relays' upstreams found, preloaded images converted.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::files::is_executable;
use crate::images::{cache, preload, registries};

use super::{Layout, SandboxConfig, SandboxError, cgroup, config, engines, io, net, record, slots};

/// Where a network namespace's ephemeral port range is set.
pub(super) const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// What the engine keeps of the host's preparation.
pub(super) struct Prepared {
    /// The berth binary that runs as each job's stage-1 helper.
    pub helper: PathBuf,
    /// None: cgroups cannot be delegated here; jobs run dockerd --rootless.
    pub layout: Option<Layout>,
    /// MTU of job links.
    pub mtu: u32,
    /// The host's `ip_local_port_range`, which every job's outgoing
    /// connections get once its dockerd has read the job's narrowed one.
    pub ephemeral_ports: String,
    /// dockerd, containerd and runc as found, with their versions.
    pub engine: engines::Engine,
    /// What of the host every job's private root is made from.
    pub root: super::fs::root::HostRoot,
    /// Whether each job gets a binfmt_misc instance of its own (the kernel
    /// has one per user namespace).
    pub own_binfmt: bool,
    /// What workspaces jobs may have.
    pub workspace_rules: super::fs::workspaces::Rules,
    /// Registry settings for every job, CA files read.
    pub registries: registries::Loaded,
    /// Where the jobs' DNS relays forward.
    pub upstreams: Vec<SocketAddr>,
    /// Archives loaded into (or shared with) every new job.
    pub preloads: Vec<PathBuf>,
    /// The pull-through cache, when enabled (stopped before the lock goes).
    pub cache: Option<cache::Cache>,
    /// Project caches (warm starts per key), when enabled.
    pub project_caches: Option<std::sync::Arc<super::fs::caches::Pool>>,
    /// Exclusive lock on the state dir, held for the engine's lifetime.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The workspace rules, every path with its links resolved.
fn workspace_rules(cfg: &SandboxConfig) -> Result<super::fs::workspaces::Rules, SandboxError> {
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(io("cannot resolve", p));
    let allowed = cfg
        .workspaces
        .allowed_roots
        .iter()
        .map(|r| canonical(r))
        .collect::<Result<_, _>>()?;
    let start = u64::from(cfg.uid_base);
    Ok(super::fs::workspaces::Rules {
        allowed,
        state_dir: canonical(&cfg.state_dir)?,
        job_uids: start..start + u64::from(cfg.uid_ranges) * u64::from(config::RANGE_SIZE),
    })
}

/// In the state dir: the engine's versions as last read, by file, so
/// that an agent runs `--version` only for parts that changed.
const ENGINE_FILE: &str = "engine.json";

pub(super) fn prepare(cfg: &SandboxConfig) -> Result<Prepared, SandboxError> {
    cfg.validate()?;
    let helper = if cfg.helper.as_os_str().is_empty() {
        std::env::current_exe().map_err(io("cannot find", Path::new("/proc/self/exe")))?
    } else {
        cfg.helper.clone()
    };
    check_prerequisites(cfg, &helper)?;
    let engine = cfg
        .engine()
        .probe_remembering(&cfg.state_dir.join(ENGINE_FILE))?;
    tracing::info!(engine = %engine.describe(), "jobs run this engine");
    // Socket paths below the state dir must fit sun_path (108 bytes).
    if cfg.state_dir.as_os_str().len() > 48 {
        return Err(config::ConfigError::Invalid {
            key: "state_dir",
            why: format!(
                "{} is longer than 48 bytes; dockerd's sockets below it would not fit a unix socket path",
                cfg.state_dir.display()
            ),
        }
        .into());
    }
    // 0711: jobs traverse to their own directory but list nothing.
    mkdir_mode(&cfg.state_dir, 0o711)?;
    if let Some((dir, mode)) = closed_ancestor(&cfg.state_dir) {
        return Err(SandboxError::Prerequisite(format!(
            "{} (mode {mode:04o}) keeps every job out of its own directory below {}: a job's \
             daemon runs as an unprivileged host user and must pass through it; \
             chmod o+x {} (or choose another state_dir)",
            dir.display(),
            cfg.state_dir.display(),
            dir.display()
        )));
    }
    mkdir_mode(&record::jobs_dir(&cfg.state_dir), 0o711)?;
    mkdir_mode(&slots::slots_dir(&cfg.state_dir), 0o700)?;
    let lock = lock_state_dir(&cfg.state_dir)?;
    let mountinfo = std::fs::read_to_string(cfg.proc_root.join("self/mountinfo"))
        .map_err(io("cannot read", &cfg.proc_root.join("self/mountinfo")))?;
    let host = cgroup::Host {
        proc_root: &cfg.proc_root,
        systemd: cgroup::Host::systemd_booted(),
    };
    let layout = match cgroup::detect(&mountinfo, &cfg.cgroup_root)
        .and_then(|l| cgroup::prepare(l, &host, &cfg.cgroup_parent))
    {
        Ok(l) => {
            tracing::debug!(cgroups = %l.describe(), "jobs get delegated cgroups");
            Some(l)
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "CGROUPS CANNOT BE DELEGATED: jobs fall back to dockerd --rootless, without \
                 whole-job limits, per-container --memory/--cpus, docker top, pause or stats; \
                 give the agent a writable cgroup filesystem to fix this"
            );
            None
        }
    };
    net::enable_forwarding(&cfg.proc_root)?;
    let mtu = if cfg.mtu == 0 {
        net::default_route_mtu()
    } else {
        cfg.mtu
    };
    let upstreams = if cfg.dns_upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        net::nameservers(&text)
            .into_iter()
            .map(|ip: IpAddr| SocketAddr::new(ip, 53))
            .collect()
    } else {
        cfg.dns_upstreams.clone()
    };
    let ports_file = Path::new(EPHEMERAL_PORTS);
    let ephemeral_ports = std::fs::read_to_string(ports_file)
        .map_err(io("cannot read", ports_file))?
        .trim()
        .to_string();
    let preloads = preload::prepare(&cfg.preload, &cfg.state_dir.join("preload"))?;
    let mut registries = cfg.registries.load().map_err(config::ConfigError::from)?;
    let cache = match cfg.cache_addr() {
        Some(addr) => {
            let password = cfg.cache.validate().map_err(config::ConfigError::from)?;
            let c = cache::Cache::start(&cfg.cache, password, &cfg.state_dir.join("cache"), addr)?;
            // First: a job's dockerd tries its mirrors in order, then the
            // upstream itself.
            registries.mirrors.insert(0, c.mirror());
            Some(c)
        }
        None => None,
    };
    let root = super::fs::root::HostRoot::read(Path::new("/"), &engine.path, &engine.dockerd.path);
    let workspace_rules = workspace_rules(cfg)?;
    let own_binfmt = super::binfmt::own_instances();
    if !own_binfmt && !cfg.host_emulation {
        return Err(SandboxError::Prerequisite(format!(
            "host_emulation = false {}",
            super::binfmt::needs_own_instances()
        )));
    }
    if cfg.image_store == config::ImageStore::Containerd
        && engine.dockerd.version < config::ImageStore::CONTAINERD_SINCE
    {
        return Err(SandboxError::Prerequisite(format!(
            "image_store = \"containerd\" needs dockerd {} or later; {} is {} \
             (Debian 13's docker.io has 26.1: point sandbox.dockerd and sandbox.containerd at it, \
             or remove image_store)",
            config::ImageStore::CONTAINERD_SINCE,
            engine.dockerd.path.display(),
            engine.dockerd.release
        )));
    }
    let project_caches = if cfg.project_caches.enabled {
        Some(std::sync::Arc::new(
            super::fs::caches::Pool::open(&cfg.state_dir, &cfg.project_caches)
                .map_err(|e| SandboxError::Prerequisite(e.to_string()))?,
        ))
    } else {
        None
    };
    Ok(Prepared {
        helper,
        layout,
        mtu,
        ephemeral_ports,
        engine,
        root,
        own_binfmt,
        workspace_rules,
        registries,
        upstreams,
        preloads,
        cache,
        project_caches,
        _lock: lock,
    })
}

fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, SandboxError> {
    let path = state_dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("cannot open", &path))?;
    let mut lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(f, _)| {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            drop(f);
            SandboxError::Prerequisite(format!(
                "another berth agent (pid {}) is using {}; stop it or give this one its own --state-dir",
                holder.trim(),
                state_dir.display()
            ))
        },
    )?;
    use std::io::{Seek, Write};
    let _ = lock.set_len(0);
    let _ = lock.seek(std::io::SeekFrom::Start(0));
    let _ = write!(lock, "{}", std::process::id());
    Ok(lock)
}

fn check_prerequisites(cfg: &SandboxConfig, helper: &Path) -> Result<(), SandboxError> {
    let pre = |s: String| Err(SandboxError::Prerequisite(s));
    if !nix::unistd::geteuid().is_root() {
        return pre(
            "berth's sandbox needs root: it creates user namespaces over an exclusive \
                    host id range, cgroups and host network links; run the agent as root"
                .into(),
        );
    }
    let missing = super::sys::missing_capabilities(&cfg.proc_root);
    if !missing.is_empty() {
        return pre(format!(
            "the agent lacks capabilities it needs: {}; give them to its container \
             ({}, as the Dockerfile's header shows)",
            super::sys::describe_capabilities(&missing),
            super::sys::cap_add_flags(&missing)
        ));
    }
    let max_userns = std::fs::read_to_string(cfg.proc_root.join("sys/user/max_user_namespaces"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if max_userns == Some(0) {
        return pre(
            "user namespaces are disabled: run `sysctl -w user.max_user_namespaces=28633`".into(),
        );
    }
    if !cfg.proc_root.join("self/ns/user").exists() {
        return pre(
            "this kernel has no user namespaces (CONFIG_USER_NS): berth cannot isolate jobs".into(),
        );
    }
    if !is_executable(&cfg.dockerd) {
        return pre(format!(
            "dockerd not found at {}: install it (`apt-get install docker.io`) or set dockerd in the configuration",
            cfg.dockerd.display()
        ));
    }
    if !is_executable(helper) {
        return pre(format!(
            "berth helper binary {} is not executable",
            helper.display()
        ));
    }
    if cfg.cache.enabled && !is_executable(&cfg.cache.registry) {
        return pre(format!(
            "[cache] is enabled but its registry {} is not there: `apt-get install docker-registry` or set cache.registry",
            cfg.cache.registry.display()
        ));
    }
    // Links and addresses go through netlink; only the rules need a tool.
    if !crate::files::on_path("iptables") {
        return pre("`iptables` not found: install it (`apt-get install iptables`)".into());
    }
    if cfg.default_limits.disk().is_some() {
        // Each job's own disk: a loop-mounted ext4 image.
        if !crate::files::on_path("mkfs.ext4") {
            return pre(
                "`mkfs.ext4` not found: install it (`apt-get install e2fsprogs`), or set \
                 [sandbox.default_limits] disk_bytes = 0 to keep jobs' data on the state dir's \
                 filesystem without a disk bound"
                    .into(),
            );
        }
        if !Path::new("/dev/loop-control").exists() {
            return pre(
                "/dev/loop-control is missing: jobs' disks are loop devices; load the loop \
                 module (`modprobe loop`), give a container `--device /dev/loop-control` and \
                 the loop devices, or set [sandbox.default_limits] disk_bytes = 0"
                    .into(),
            );
        }
    }
    Ok(())
}

/// The first directory above `dir` that others may not pass through
/// (no `o+x`), with its mode: a job's unprivileged users could not reach
/// their own files below it.
fn closed_ancestor(dir: &Path) -> Option<(PathBuf, u32)> {
    dir.ancestors().skip(1).find_map(|a| {
        let mode = std::fs::metadata(a).ok()?.permissions().mode() & 0o7777;
        (mode & 0o001 == 0).then(|| (a.to_path_buf(), mode))
    })
}

pub(super) fn mkdir_mode(path: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io("cannot create", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot chmod", path))
}

pub(super) fn chown(path: &Path, id: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::chown(path, Some(id), Some(id)).map_err(io("cannot chown", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_below_a_closed_directory_is_named() {
        let base = std::env::temp_dir().join(format!("berth-host-{}", std::process::id()));
        let state = base.join("closed/state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let closed = base.join("closed");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(closed_ancestor(&state), Some((closed.clone(), 0o700)));
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(closed_ancestor(&state), None);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
