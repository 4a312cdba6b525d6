//! The sandbox engine: one real dockerd per job, in fresh user, mount, pid,
//! network, ipc, uts and cgroup namespaces, on a host id range and a link of
//! its own, under whole-job cgroup limits. It starts jobs, watches them,
//! tears them down without a trace and recovers what a crashed agent left.
//! It knows nothing of TLS or HTTP clients: it hands out a unix socket.

pub mod cgroup;
pub mod child;
pub mod config;
mod dns;
pub mod evidence;
pub mod net;
mod ping;
pub mod preload;
pub mod protocol;
pub mod record;
pub mod seed;
pub mod slots;
mod sys;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use cgroup::{JobCgroup, Layout};
pub use config::{Limits, SandboxConfig};
/// Whether a dockerd answers `/_ping` on a socket (the engine's readiness check).
pub use ping::ping;
pub use record::JobRecord;

use child::{ChildSpec, HIDDEN_SUBCOMMAND};

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
    Dns(#[from] dns::DnsError),
    #[error(transparent)]
    Preload(#[from] preload::PreloadError),
    #[error(transparent)]
    Seed(#[from] seed::SeedError),
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
    /// The job's dockerd (or its init) ended without being asked to.
    Failed(String),
    Stopping,
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
    relay: Mutex<Option<dns::Relay>>,
    started: Instant,
}

impl Sandbox {
    pub fn id(&self) -> &str {
        &self.inner.id
    }
    pub fn record(&self) -> JobRecord {
        self.inner.record.lock().unwrap().clone()
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
    pub fn age(&self) -> Duration {
        self.inner.started.elapsed()
    }
    /// Resolves once the job is no longer running (failed or stopped).
    pub async fn ended(&self) -> Status {
        let mut rx = self.inner.status.subscribe();
        let s = rx
            .wait_for(|s| matches!(s, Status::Failed(_) | Status::Stopped))
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
}

enum SeedState {
    Unbuilt,
    Ready(Arc<seed::Seed>),
    /// Shared images are not available here; every job loads the archives.
    Off,
}

pub struct Engine {
    cfg: Arc<SandboxConfig>,
    helper: PathBuf,
    /// None: cgroups cannot be delegated here; jobs run dockerd --rootless.
    layout: Option<Layout>,
    mtu: u32,
    upstreams: Vec<SocketAddr>,
    /// docker-save archives loaded into every new job.
    preloads: Vec<PathBuf>,
    /// The shared image store built from the preloads (see `seed`).
    seed: tokio::sync::Mutex<SeedState>,
    jobs: Mutex<HashMap<String, Sandbox>>,
    /// Exclusive lock on the state dir for the engine's lifetime: two agents
    /// on one state dir would tear down each other's jobs as "left over".
    _lock: nix::fcntl::Flock<std::fs::File>,
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

fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().r#gen();
    format!("{:012x}", n & 0xffff_ffff_ffff)
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
    for (prog, pkg) in [("ip", "iproute2"), ("iptables", "iptables")] {
        if std::process::Command::new(prog).arg("-V").output().is_err() {
            return pre(format!(
                "`{prog}` not found: install it (`apt-get install {pkg}`)"
            ));
        }
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io("cannot create", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot chmod", path))
}

fn chown(path: &Path, id: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::chown(path, Some(id), Some(id)).map_err(io("cannot chown", path))
}

impl Engine {
    /// Validates the configuration, checks every prerequisite and prepares the
    /// host (state dirs, cgroup parent, forwarding). Does not recover old jobs:
    /// call [`Engine::recover`] for that.
    pub fn new(cfg: SandboxConfig) -> Result<Engine, SandboxError> {
        cfg.validate()?;
        let helper = if cfg.helper.as_os_str().is_empty() {
            std::env::current_exe().map_err(io("cannot find", Path::new("/proc/self/exe")))?
        } else {
            cfg.helper.clone()
        };
        check_prerequisites(&cfg, &helper)?;
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
        mkdir_mode(&record::jobs_dir(&cfg.state_dir), 0o711)?;
        mkdir_mode(&slots::slots_dir(&cfg.state_dir), 0o700)?;
        let lock = lock_state_dir(&cfg.state_dir)?;
        // dockerd writes its trust key to /etc/docker; each job binds its own
        // directory over it, which needs the mount point to exist.
        if !Path::new("/etc/docker").is_dir() {
            mkdir_mode(Path::new("/etc/docker"), 0o755)?;
        }
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
        let preloads = preload::prepare(&cfg.preload, &cfg.state_dir.join("preload"))?;
        Ok(Engine {
            preloads,
            seed: tokio::sync::Mutex::new(SeedState::Unbuilt),
            cfg: Arc::new(cfg),
            helper,
            layout,
            mtu,
            upstreams,
            jobs: Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// True when jobs get delegated cgroups (ordinary dockerd); false when
    /// they fall back to `dockerd --rootless`.
    pub fn delegates_cgroups(&self) -> bool {
        self.layout.is_some()
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    pub fn get(&self, id: &str) -> Option<Sandbox> {
        self.jobs.lock().unwrap().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Sandbox> {
        self.jobs.lock().unwrap().values().cloned().collect()
    }

    /// Starts a job and returns once its dockerd answers `/_ping`.
    pub async fn start(&self, limits: Option<Limits>) -> Result<Sandbox, SandboxError> {
        let seed = if self.preloads.is_empty() || !self.cfg.share_preloads {
            None
        } else {
            self.ensure_seed().await
        };
        self.start_with(limits, seed).await
    }

    /// The shared image store, built on first use from a sandbox that loads
    /// the preloads. None (and every job loads the archives itself) where
    /// idmapped mounts are not available.
    async fn ensure_seed(&self) -> Option<Arc<seed::Seed>> {
        let mut state = self.seed.lock().await;
        match &*state {
            SeedState::Ready(s) => return Some(s.clone()),
            SeedState::Off => return None,
            SeedState::Unbuilt => {}
        }
        let t0 = Instant::now();
        match self.build_seed().await {
            Ok(s) => {
                tracing::info!(
                    layers = s.layers.len(),
                    took_ms = t0.elapsed().as_millis() as u64,
                    "shared image store ready: preloaded images are mounted into jobs, not copied"
                );
                let s = Arc::new(s);
                *state = SeedState::Ready(s.clone());
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared images unavailable: every job loads the preloaded archives itself");
                let _ = seed::remove(&self.cfg.state_dir.join("seed"));
                *state = SeedState::Off;
                None
            }
        }
    }

    async fn build_seed(&self) -> Result<seed::Seed, SandboxError> {
        let sb = Box::pin(self.start_with(None, None)).await?;
        let rec = sb.record();
        // Stop dockerd gracefully so that its image store is complete on disk.
        sb.inner.status.send_replace(Status::Stopping);
        if let Some(init) = rec.init_pid {
            sys::kill(init as i32, nix::sys::signal::Signal::SIGTERM).ok();
        }
        let mut exited = sb.inner.exited.clone();
        if tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| e.is_some()))
            .await
            .is_err()
        {
            if let Some(init) = rec.init_pid {
                sys::kill(init as i32, nix::sys::signal::Signal::SIGKILL).ok();
            }
            let _ = exited.wait_for(|e| e.is_some()).await;
        }
        let data = sb.inner.dir.join("root").join("data");
        let dest = self.cfg.state_dir.join("seed").join("data");
        let host_id = rec.host_id;
        let adopted = tokio::task::spawn_blocking(move || seed::adopt(&data, &dest, host_id))
            .await
            .map_err(|e| start_err(sb.id(), e))?;
        self.teardown(sb.id()).await?;
        let s = adopted?;
        // Idmapped mounts of this filesystem must work here, or jobs load.
        probe_idmap(&s.data)?;
        Ok(s)
    }

    async fn start_with(
        &self,
        limits: Option<Limits>,
        seed: Option<Arc<seed::Seed>>,
    ) -> Result<Sandbox, SandboxError> {
        let limits = limits.unwrap_or_else(|| self.cfg.default_limits.clone());
        limits.validate()?;
        let id = new_id();
        let cfg = self.cfg.clone();
        let slot = {
            let (cfg, jid) = (cfg.clone(), id.clone());
            tokio::task::spawn_blocking(move || slots::claim(&cfg, &jid))
                .await
                .map_err(|e| start_err(&id, e))??
        };
        let (host_ip, job_ip) = cfg.link_addrs(slot);
        let host_id = slots::range_of(&cfg, slot).start as u32;
        let dir = record::job_dir(&cfg.state_dir, &id);
        let mut rec = JobRecord {
            id: id.clone(),
            slot,
            host_id,
            host_ip,
            job_ip,
            cgroup: self
                .layout
                .clone()
                .map(|l| JobCgroup::new(l, &cfg.cgroup_parent, &id)),
            monitor_pid: None,
            init_pid: None,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        if let Err(e) = mkdir_mode(&dir, 0o711).and_then(|()| {
            rec.save(&cfg.state_dir)
                .map_err(io("cannot write record in", &dir))
        }) {
            let _ = slots::release(&cfg.state_dir, slot, &id);
            return Err(e);
        }
        let (status, _) = watch::channel(Status::Starting);
        let (exited_tx, exited) = watch::channel(None);
        let sb = Sandbox {
            inner: Arc::new(Inner {
                id: id.clone(),
                record: Mutex::new(rec.clone()),
                dir: dir.clone(),
                status,
                exited,
                relay: Mutex::new(None),
                started: Instant::now(),
            }),
        };
        self.jobs.lock().unwrap().insert(id.clone(), sb.clone());
        match self.launch(&sb, &mut rec, &limits, exited_tx, seed).await {
            Ok(()) => {
                sb.inner.status.send_if_modified(|s| {
                    if *s == Status::Starting {
                        *s = Status::Running;
                        true
                    } else {
                        false
                    }
                });
                tracing::info!(job = %id, slot, took_ms = sb.age().as_millis() as u64, "job ready");
                Ok(sb)
            }
            Err(e) => {
                // The log goes with the job's directory: keep it first.
                let kept = evidence::keep(&cfg.state_dir, &id, &sb.dockerd_log());
                tracing::warn!(job = %id, error = %e, log = ?kept.as_ref().map(|k| &k.path),
                    "job failed to start; tearing it down");
                if let Err(te) = self.teardown(&id).await {
                    tracing::error!(job = %id, error = %te, "teardown after failed start");
                }
                Err(SandboxError::StartFailed {
                    id,
                    source: Box::new(e),
                    kept,
                })
            }
        }
    }

    async fn launch(
        &self,
        sb: &Sandbox,
        rec: &mut JobRecord,
        limits: &Limits,
        exited_tx: watch::Sender<Option<i32>>,
        seed: Option<Arc<seed::Seed>>,
    ) -> Result<(), SandboxError> {
        let cfg = &self.cfg;
        let id = rec.id.clone();
        let dir = sb.inner.dir.clone();
        let root = dir.join("root");
        let api = dir.join("api");
        // Private to the job's root (and the agent): other jobs map other ids.
        for d in [&root, &api] {
            mkdir_mode(d, 0o700)?;
            chown(d, rec.host_id)?;
        }
        for sub in ["data", "exec", "home", "xdg", "tmp", "etc-docker"] {
            let p = root.join(sub);
            mkdir_mode(&p, 0o700)?;
            chown(&p, rec.host_id)?;
        }
        if let Some(sd) = &seed {
            let (sd, jd, data, uid) = (sd.clone(), dir.clone(), root.join("data"), rec.host_id);
            tokio::task::spawn_blocking(move || seed::materialize(&sd, &jd, &data, uid))
                .await
                .map_err(|e| start_err(&id, e))??;
        }
        let daemon_json = root.join("daemon.json");
        std::fs::write(&daemon_json, "{}\n").map_err(io("cannot write", &daemon_json))?;
        chown(&daemon_json, rec.host_id)?;
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {}\n", rec.host_ip))
            .map_err(io("cannot write", &resolv))?;
        std::fs::set_permissions(&resolv, std::fs::Permissions::from_mode(0o644))
            .map_err(io("cannot chmod", &resolv))?;

        if let Some(cg) = &rec.cgroup {
            let (cg, l, uid) = (cg.clone(), limits.clone(), rec.host_id);
            tokio::task::spawn_blocking(move || cg.create(&l, uid, uid))
                .await
                .map_err(|e| start_err(&id, e))??;
        }
        net::create_link(&id, rec.host_ip, self.mtu)?;
        net::add_rules(&id, rec.host_ip, rec.job_ip)?;
        *sb.inner.relay.lock().unwrap() = Some(
            dns::Relay::start(
                SocketAddr::new(rec.host_ip.into(), 53),
                self.upstreams.clone(),
            )
            .await?,
        );

        let spec = ChildSpec {
            job_id: id.clone(),
            dockerd: cfg.dockerd.clone(),
            root: root.clone(),
            api_socket: api_socket(&dir),
            etc_docker: root.join("etc-docker"),
            resolv_conf: resolv,
            hostname: format!("berth-{id}"),
            cgroup: self.layout.clone(),
            cgroupns: self.layout.is_some() && cfg.proc_root.join("self/ns/cgroup").exists(),
            peer_ifname: net::peer_ifname(&id),
            job_ip: rec.job_ip,
            host_ip: rec.host_ip,
            mtu: self.mtu,
            // dockerd stops its containers within the grace, leaving it a
            // margin to exit before the SIGKILL.
            shutdown_timeout: (cfg.stop_grace.as_secs() * 3 / 5).max(1),
            extra_args: cfg.extra_dockerd_args.clone(),
            shared_layers: seed
                .as_ref()
                .map(|sd| {
                    (0..sd.layers.len())
                        .map(|i| seed::layer_mount_point(&dir, i))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let log_path = dir.join("dockerd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io("cannot open", &log_path))?;
        let (chan, theirs) = protocol::pair().map_err(|e| start_err(&id, e))?;
        let mut cmd = tokio::process::Command::new(&self.helper);
        cmd.arg(HIDDEN_SUBCOMMAND)
            .arg(serde_json::to_string(&spec).map_err(|e| start_err(&id, e))?)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io("cannot dup", &log_path))?)
            .stderr(log);
        sys::place_on_fd3(&mut cmd, theirs.as_raw_fd());
        let mut child = cmd
            .spawn()
            .map_err(io("cannot start helper", &self.helper))?;
        drop(theirs);
        let pid = child
            .id()
            .ok_or_else(|| start_err(&id, "helper exited at once"))?;
        rec.monitor_pid = Some(pid);
        rec.save(&cfg.state_dir)
            .map_err(io("cannot write record in", &dir))?;
        *sb.inner.record.lock().unwrap() = rec.clone();

        // Watch the monitor from now on: its exit is the job's end.
        let status = sb.inner.status.clone();
        let jid = id.clone();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(s) => std::os::unix::process::ExitStatusExt::into_raw(s),
                Err(_) => -1,
            };
            let code = code_of(code);
            let _ = exited_tx.send(Some(code));
            status.send_modify(|s| {
                *s = match s {
                    Status::Stopping | Status::Stopped => Status::Stopped,
                    _ => {
                        let why = describe_exit(code);
                        tracing::warn!(job = %jid, %why, "job's dockerd ended unexpectedly");
                        Status::Failed(why)
                    }
                }
            });
        });

        // The shared layers, seen through the job's id map, go to the helper
        // by fd; it attaches them before it creates the job's namespaces.
        let mut trees = Vec::new();
        if let Some(sd) = &seed {
            let ns = IdmapNs::new(rec.host_id)?;
            for l in &sd.layers {
                trees.push(
                    sys::idmapped_readonly_clone(&sd.data.join(l), ns.fd())
                        .map_err(|e| start_err(&id, e))?,
                );
            }
        }
        let handshake = Handshake {
            chan,
            pid,
            trees,
            cgroup: rec.cgroup.clone(),
            host_id: rec.host_id,
            proc_root: cfg.proc_root.clone(),
            job_id: id.clone(),
            step: cfg.ready_timeout,
        };
        let (init_pid, done) = tokio::task::spawn_blocking(move || handshake.run())
            .await
            .map_err(|e| start_err(&id, e))?;
        if init_pid.is_some() {
            rec.init_pid = init_pid;
            rec.save(&cfg.state_dir)
                .map_err(io("cannot write record in", &dir))?;
            *sb.inner.record.lock().unwrap() = rec.clone();
        }
        done?;
        let socket = api_socket(&dir);
        let deadline = Instant::now() + cfg.ready_timeout;
        let mut exited = sb.inner.exited.clone();
        loop {
            if ping::ping(&socket).await {
                break;
            }
            if exited.borrow().is_some() {
                return Err(start_err(
                    &id,
                    format!(
                        "dockerd exited during start ({})",
                        describe_exit(exited.borrow().unwrap_or(-1)),
                    ),
                ));
            }
            if Instant::now() > deadline {
                return Err(SandboxError::NotReady {
                    id,
                    timeout: cfg.ready_timeout,
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), exited.changed()).await;
        }
        for tar in self.preloads.iter().filter(|_| seed.is_none()) {
            ping::load_image(&socket, tar)
                .await
                .map_err(|e| start_err(&id, format!("preloading {}: {e}", tar.display())))?;
        }
        Ok(())
    }

    /// Stops a job: SIGTERM to its init (forwarded to dockerd), a bounded
    /// grace, SIGKILL of everything left, then removal of every trace on the
    /// host. Idempotent; works for jobs of this process and for records left
    /// by an earlier one.
    pub async fn teardown(&self, id: &str) -> Result<Teardown, SandboxError> {
        let t0 = Instant::now();
        let live = self.get(id);
        let rec = match &live {
            Some(sb) => JobRecord::load(&self.cfg.state_dir, id).unwrap_or_else(|_| sb.record()),
            None => JobRecord::load(&self.cfg.state_dir, id)
                .map_err(|_| SandboxError::NoSuchJob(id.into()))?,
        };
        let mut killed = false;
        if let Some(sb) = &live {
            sb.inner.status.send_modify(|s| {
                if !matches!(s, Status::Stopped) {
                    *s = Status::Stopping
                }
            });
            let mut exited = sb.inner.exited.clone();
            if exited.borrow().is_none() {
                // With no container running, a graceful stop protects nothing
                // (the job's state is discarded) and dockerd 20.10 spends a
                // fixed second waiting for its containerd: go straight to the kill.
                let idle = ping::running_containers(&sb.socket()).await == Some(0);
                if let (Some(init), false) = (rec.init_pid, idle) {
                    sys::kill(init as i32, nix::sys::signal::Signal::SIGTERM).ok();
                }
                let grace = if idle {
                    Duration::ZERO
                } else {
                    self.cfg.stop_grace
                };
                if grace.is_zero()
                    || tokio::time::timeout(grace, exited.wait_for(|e| e.is_some()))
                        .await
                        .is_err()
                {
                    killed = true;
                    if let Some(init) = rec.init_pid {
                        // Killing a pid namespace's init kills every process in it.
                        sys::kill(init as i32, nix::sys::signal::Signal::SIGKILL).ok();
                    }
                }
            }
        } else if let Some(init) = rec.init_pid.filter(|p| is_job_process(*p, id)) {
            killed = true;
            sys::kill(init as i32, nix::sys::signal::Signal::SIGKILL).ok();
        }
        let cfg = self.cfg.clone();
        let rec2 = rec.clone();
        let id2 = id.to_string();
        let cg = rec.cgroup.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
            if let Some(cg) = &cg {
                cg.kill_all(Duration::from_secs(10))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| start_err(id, e))??;
        if let Some(sb) = &live {
            let mut exited = sb.inner.exited.clone();
            let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| e.is_some()))
                .await;
            sb.inner.relay.lock().unwrap().take();
        }
        tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
            if let Some(cg) = &rec2.cgroup {
                cg.remove()?;
            }
            net::delete_rules(&id2)?;
            net::delete_link(&id2)?;
            let dir = record::job_dir(&cfg.state_dir, &id2);
            // The record goes last: until here a crash leaves it for recovery.
            for entry in ["root", "api"] {
                let p = dir.join(entry);
                if p.exists() {
                    std::fs::remove_dir_all(&p).map_err(io("cannot remove", &p))?;
                }
            }
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
            }
            slots::release(&cfg.state_dir, rec2.slot, &id2).map_err(io(
                "cannot release slot in",
                &slots::slots_dir(&cfg.state_dir),
            ))?;
            Ok(())
        })
        .await
        .map_err(|e| start_err(id, e))??;
        if let Some(sb) = self.jobs.lock().unwrap().remove(id) {
            sb.inner.status.send_replace(Status::Stopped);
        }
        let took = t0.elapsed();
        tracing::info!(job = %id, took_ms = took.as_millis() as u64, killed, "job torn down");
        Ok(Teardown {
            id: id.into(),
            took,
            killed,
        })
    }

    /// Tears down every job recorded in the state dir that this process does
    /// not run (left by an agent that crashed or was killed), and releases
    /// slot claims that have no job. Returns the ids torn down.
    pub async fn recover(&self) -> Vec<Result<String, SandboxError>> {
        let mut out = Vec::new();
        for id in JobRecord::list_ids(&self.cfg.state_dir) {
            if self.get(&id).is_some() {
                continue;
            }
            tracing::warn!(job = %id, "recovering job left by a previous run");
            out.push(self.teardown(&id).await.map(|t| t.id).or_else(|e| match e {
                // A directory without a record: created and crashed before the
                // record was written. Nothing else of it exists.
                SandboxError::NoSuchJob(_) => {
                    let dir = record::job_dir(&self.cfg.state_dir, &id);
                    std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
                    Ok(id.clone())
                }
                e => Err(e),
            }));
        }
        let state = self.cfg.state_dir.clone();
        let orphans =
            slots::orphan_claims(&state, &|owner| record::job_dir(&state, owner).exists());
        for (n, owner) in orphans {
            let _ = slots::release(&state, n, &owner);
        }
        out
    }

    /// Tears down every job of this process (agent shutdown).
    pub async fn shutdown(&self) -> Vec<Result<Teardown, SandboxError>> {
        let ids: Vec<String> = self.jobs.lock().unwrap().keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.push(self.teardown(&id).await);
        }
        out
    }
}

/// The agent's side of a job's start, from the spawned stage-1 helper to a
/// started dockerd (see `protocol`). Blocking: it runs off the runtime.
struct Handshake {
    chan: protocol::AgentEnd,
    /// The stage-1 helper.
    pid: u32,
    trees: Vec<std::os::fd::OwnedFd>,
    cgroup: Option<JobCgroup>,
    host_id: u32,
    proc_root: PathBuf,
    job_id: String,
    /// Bound on each step.
    step: Duration,
}

impl Handshake {
    /// The job's init pid (once known) and how the start went.
    fn run(self) -> (Option<u32>, Result<(), SandboxError>) {
        let mut init = None;
        let r = self.steps(&mut init);
        (init, r)
    }

    fn steps(mut self, init: &mut Option<u32>) -> Result<(), SandboxError> {
        let id = self.job_id.clone();
        let proto = |e: protocol::ProtocolError| match e {
            protocol::ProtocolError::Failed { message } => start_err(&id, message),
            e => start_err(&id, format!("stage-1 helper: {e}")),
        };
        // The helper goes into the job's delegated cgroups before it
        // creates the job's cgroup namespace, which is rooted there.
        if let Some(cg) = &self.cgroup {
            cg.attach(self.pid)?;
        }
        self.chan
            .start(&std::mem::take(&mut self.trees))
            .map_err(proto)?;
        self.chan.unshared(self.step).map_err(proto)?;
        // Namespaces exist: the helper, and the init it forks next, move to
        // their leaf; then ids and the link.
        if let Some(cg) = &self.cgroup {
            cg.settle(self.pid)?;
        }
        let map = format!("0 {} {}\n", self.host_id, config::RANGE_SIZE);
        for f in ["uid_map", "gid_map"] {
            let p = self.proc_root.join(self.pid.to_string()).join(f);
            std::fs::write(&p, &map).map_err(io("cannot write", &p))?;
        }
        net::move_peer(&self.job_id, self.pid)?;
        self.chan.mapped().map_err(proto)?;
        // The helper names the init it forked; the init says when dockerd
        // runs. Either may come first.
        loop {
            match self
                .chan
                .recv("the job's init and dockerd", self.step)
                .map_err(proto)?
            {
                protocol::FromHelper::Init { pid } => *init = Some(pid),
                protocol::FromHelper::Ready if init.is_some() => return Ok(()),
                protocol::FromHelper::Ready => {
                    // Ready before Init: the pid follows.
                    match self.chan.recv("init", self.step).map_err(proto)? {
                        protocol::FromHelper::Init { pid } => {
                            *init = Some(pid);
                            return Ok(());
                        }
                        other => return Err(proto(protocol::unexpected("init", &other))),
                    }
                }
                other => return Err(proto(protocol::unexpected("init or ready", &other))),
            }
        }
    }
}

/// A user namespace that maps 0..65535 onto `first..`, held by a short-lived
/// helper process: the id map of a job's shared layer mounts.
struct IdmapNs {
    child: std::process::Child,
    ns: std::fs::File,
}

impl IdmapNs {
    fn new(first: u32) -> Result<IdmapNs, SandboxError> {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        sys::unshare_user_in_child(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(io("cannot start", Path::new("sleep")))?;
        let pid = child.id();
        let done = (|| {
            let ns_path = PathBuf::from(format!("/proc/{pid}/ns/user"));
            let map = format!("0 {first} {}\n", config::RANGE_SIZE);
            for f in ["uid_map", "gid_map"] {
                let p = PathBuf::from(format!("/proc/{pid}/{f}"));
                std::fs::write(&p, &map).map_err(io("cannot write", &p))?;
            }
            std::fs::File::open(&ns_path).map_err(io("cannot open", &ns_path))
        })();
        match done {
            Ok(ns) => Ok(IdmapNs { child, ns }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.ns)
    }
}

impl Drop for IdmapNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that an idmapped clone of `dir` can be made here.
fn probe_idmap(dir: &Path) -> Result<(), SandboxError> {
    let ns = IdmapNs::new(u32::MAX - config::RANGE_SIZE - 1)?;
    sys::idmapped_readonly_clone(dir, ns.fd())
        .map(drop)
        .map_err(|e| start_err("seed", e))
}

/// True when `pid` is still this job's stage-1/init process (not a reused pid).
fn is_job_process(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let s = String::from_utf8_lossy(&c);
            s.contains(HIDDEN_SUBCOMMAND) && s.contains(id)
        })
        .unwrap_or(false)
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

pub fn describe_exit(code: i32) -> String {
    match code {
        0 => "dockerd exited".into(),
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
    fn exit_descriptions() {
        assert_eq!(describe_exit(137), "dockerd was killed by SIGKILL");
        assert_eq!(describe_exit(1), "dockerd exited with code 1");
        assert_eq!(code_of(9), 137);
        assert_eq!(code_of(1 << 8), 1);
    }

    #[test]
    fn ids_are_12_hex() {
        let id = new_id();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(new_id(), new_id());
    }
}
