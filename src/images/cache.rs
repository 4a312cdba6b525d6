//! The shared pull-through cache (`[cache]`, off by default): Debian's
//! `docker-registry` in proxy mode, started and supervised by the agent, on
//! an address of the agent's host that only its jobs (and the host itself)
//! reach. Every job's dockerd has it as its first Docker Hub mirror, so an
//! image one job pulled comes to the next from the host. Its storage is a
//! filesystem of its own under the state dir, bounded by the kernel and kept
//! below the bound by evicting the least recently used blobs; upstream
//! credentials stay in its root-only configuration, never in a job.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::UrlError;

use crate::sandbox::fs::disk;
use crate::sandbox::{backoff, net, sys};

/// The port the cache listens on, at its own address.
pub const PORT: u16 = 5000;

/// The smallest bound: the registry's own files and one small image.
pub const MIN_BYTES: u64 = 256 << 20;

/// Above this share of its bound the cache evicts, down to `LOW_WATER`.
const HIGH_WATER: f64 = 0.90;
const LOW_WATER: f64 = 0.70;

/// How often the supervisor looks at the registry and at the storage.
const TICK: Duration = Duration::from_secs(1);

/// How long the registry has to answer after it is started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A log larger than this is moved aside (one old copy kept) at each start.
const LOG_KEEP_BYTES: u64 = 16 << 20;

/// `[cache]` in berth.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// The registry pulled through: Docker Hub unless told otherwise.
    pub upstream: String,
    /// Bound on the cache's storage.
    pub max_bytes: u64,
    /// An account at the upstream (raises Docker Hub's pull limits); its
    /// password is read from `password_file` when the agent starts.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The registry binary (Debian's `docker-registry`).
    pub registry: PathBuf,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            upstream: "https://registry-1.docker.io".into(),
            max_bytes: 20 << 30,
            username: None,
            password_file: None,
            registry: "/usr/bin/docker-registry".into(),
        }
    }
}

/// A key of `[cache]` that is not valid: the variant names it.
#[derive(Debug, thiserror::Error)]
pub enum CacheConfigError {
    #[error("cache.upstream: {upstream:?}: {source}")]
    UpstreamUrl { upstream: String, source: UrlError },
    #[error("cache.upstream: {upstream:?}: an http:// or https:// registry URL")]
    UpstreamScheme { upstream: String },
    #[error("cache.upstream: credentials go in cache.username and cache.password_file")]
    UpstreamCredentials,
    #[error("cache.upstream: {upstream:?}: a registry's root URL, without a path")]
    UpstreamPath { upstream: String },
    #[error("cache.max_bytes: {max_bytes} is below 256 MiB ({MIN_BYTES})")]
    TooSmall { max_bytes: u64 },
    #[error("cache.registry: {} must be absolute", .path.display())]
    RelativeRegistry { path: PathBuf },
    #[error("cache.password_file: cache.username and cache.password_file go together")]
    HalfAnAccount,
    #[error("cache.username: {username:?} is not a user name")]
    Username { username: String },
    #[error("cache.password_file: {}: {source}", .path.display())]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cache.password_file: {} must hold the password on one line", .path.display())]
    PasswordNotOneLine { path: PathBuf },
}

impl CacheConfig {
    /// Checks every key (a disabled cache too: a typo should not wait for
    /// the day someone turns it on). Returns the upstream password, if any.
    pub fn validate(&self) -> Result<Option<String>, CacheConfigError> {
        let upstream = || self.upstream.clone();
        let url = reqwest::Url::parse(&self.upstream).map_err(|source| {
            CacheConfigError::UpstreamUrl {
                upstream: upstream(),
                source,
            }
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(CacheConfigError::UpstreamScheme {
                upstream: upstream(),
            });
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(CacheConfigError::UpstreamCredentials);
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(CacheConfigError::UpstreamPath {
                upstream: upstream(),
            });
        }
        if self.max_bytes < MIN_BYTES {
            return Err(CacheConfigError::TooSmall {
                max_bytes: self.max_bytes,
            });
        }
        if !self.registry.is_absolute() {
            return Err(CacheConfigError::RelativeRegistry {
                path: self.registry.clone(),
            });
        }
        match (&self.username, &self.password_file) {
            (None, None) => Ok(None),
            (Some(_), None) | (None, Some(_)) => Err(CacheConfigError::HalfAnAccount),
            (Some(u), Some(f)) => {
                if u.is_empty() || u.chars().any(|c| c.is_control() || c == ':') {
                    return Err(CacheConfigError::Username {
                        username: u.clone(),
                    });
                }
                let text = std::fs::read_to_string(f).map_err(|source| {
                    CacheConfigError::PasswordFile {
                        path: f.clone(),
                        source,
                    }
                })?;
                let pw = text.trim_end_matches(['\r', '\n']).to_string();
                if pw.is_empty() || pw.contains('\n') {
                    return Err(CacheConfigError::PasswordNotOneLine { path: f.clone() });
                }
                Ok(Some(pw))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cache's storage: {0}")]
    Disk(#[from] disk::DiskError),
    #[error("the cache's address or rules: {0}")]
    Net(#[from] net::NetError),
    #[error("cannot start the cache's registry {path}: {source} (apt-get install docker-registry)")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the cache's registry did not answer at {addr} within {secs} s; its log ({log}) ends:\n{tail}"
    )]
    NotReady {
        addr: SocketAddrV4,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// The running cache. Dropping it stops the registry and takes its address
/// and rules away; its storage stays for the next start.
pub struct Cache {
    addr: SocketAddrV4,
    dir: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

/// Where things live below `state_dir/cache` (0700, root's).
struct Files {
    dir: PathBuf,
    image: PathBuf,
    storage: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pid: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Files {
        Files {
            dir: dir.into(),
            image: dir.join(disk::IMAGE),
            storage: dir.join("storage"),
            config: dir.join("config.yml"),
            log: dir.join("registry.log"),
            pid: dir.join("registry.pid"),
        }
    }
}

impl Cache {
    /// The mirror URL every job's dockerd gets.
    pub fn mirror(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Where the registry logs (every request it served).
    pub fn log(&self) -> PathBuf {
        Files::new(&self.dir).log
    }

    /// Brings the cache up at `addr` with its files in `dir`: the storage
    /// mounted (made on first use, or anew when `max_bytes` changed), the
    /// address on the host's loopback with rules that let only jobs and the
    /// host in, the registry started and answering.
    pub fn start(
        cfg: &CacheConfig,
        password: Option<String>,
        dir: &Path,
        addr: SocketAddrV4,
    ) -> Result<Cache, CacheError> {
        let f = Files::new(dir);
        mkdir_private(dir)?;
        stop_stale(&f);
        mount_storage(&f, cfg.max_bytes)?;
        write_config(&f, cfg, password.as_deref(), addr)?;
        net::add_cache(addr)?;
        // The registry is the supervisor's child (it dies with that thread,
        // whichever thread made the cache). A registry that cannot be
        // started at all is an error here; one that starts but does not
        // answer (an upstream it must ask first is down) is retried, and
        // jobs pull past it meanwhile.
        let (tx, rx) = mpsc::channel();
        let (up_tx, up_rx) = mpsc::sync_channel(1);
        let registry = cfg.registry.clone();
        let bound = cfg.max_bytes;
        let supervisor = std::thread::Builder::new()
            .name("berth-cache".into())
            .spawn(move || {
                let child = match spawn(&registry, &f) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = up_tx.send(Err(e));
                        return;
                    }
                };
                let child = match ready(child, addr, &f) {
                    Ok(c) => {
                        tracing::info!(%addr, "pull-through cache serving every job");
                        Some(c)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the cache's registry is not serving yet; retried with backoff, jobs pull from their other mirrors or the upstream meanwhile");
                        None
                    }
                };
                let _ = up_tx.send(Ok(()));
                supervise(child, &registry, f, addr, bound, rx);
            })
            .map_err(io_err("start the supervisor of", dir))?;
        let up = up_rx.recv().unwrap_or_else(|_| {
            Err(CacheError::Io {
                what: "supervise",
                path: dir.into(),
                source: std::io::Error::other("the supervisor ended"),
            })
        });
        if let Err(e) = up {
            let _ = supervisor.join();
            let _ = net::remove_cache(addr);
            let _ = disk::unmount(&Files::new(dir).storage);
            return Err(e);
        }
        tracing::debug!(
            addr = %addr,
            upstream = %cfg.upstream,
            max_bytes = cfg.max_bytes,
            "pull-through cache started"
        );
        Ok(Cache {
            addr,
            dir: dir.into(),
            stop: Some(tx),
            supervisor: Some(supervisor),
        })
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
        if let Err(e) = net::remove_cache(self.addr) {
            tracing::warn!(error = %e, "cannot remove the cache's address and rules");
        }
        if let Err(e) = disk::unmount(&Files::new(&self.dir).storage) {
            tracing::warn!(error = %e, "cannot unmount the cache's storage");
        }
    }
}

/// A directory of root's alone.
fn mkdir_private(dir: &Path) -> Result<(), CacheError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", dir))
}

/// A registry an earlier agent left running (it was killed before it could
/// stop it) would hold the address.
fn stop_stale(f: &Files) {
    let Ok(text) = std::fs::read_to_string(&f.pid) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let config = f.config.as_os_str().as_encoded_bytes();
    if cmdline.windows(config.len()).any(|w| w == config) {
        tracing::warn!(pid, "stopping the cache's registry an earlier agent left");
        let _ = sys::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(&f.pid);
}

/// The storage's filesystem: an ext4 image of `bytes`, kept across agent
/// restarts; made anew when missing or of another size.
fn mount_storage(f: &Files, bytes: u64) -> Result<(), CacheError> {
    disk::unmount(&f.storage)?;
    let size = std::fs::metadata(&f.image).map(|m| m.len()).ok();
    if size.is_some_and(|s| s != bytes) {
        tracing::info!(
            was = size,
            now = bytes,
            "the cache's bound changed: its storage starts empty"
        );
        std::fs::remove_file(&f.image).map_err(io_err("remove", &f.image))?;
    }
    mkdir_private(&f.storage)?;
    if !f.image.exists() {
        disk::make_image(&f.image, bytes, 0)?;
    }
    disk::mount_image(&f.image, &f.storage, "loop,nodev,nosuid,noexec")?;
    std::fs::set_permissions(&f.storage, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", &f.storage))
}

/// The registry's configuration (0600: it may hold the upstream password).
fn write_config(
    f: &Files,
    cfg: &CacheConfig,
    password: Option<&str>,
    addr: SocketAddrV4,
) -> Result<(), CacheError> {
    let text = config_text(cfg, password, &f.storage, addr);
    let tmp = f.dir.join("config.yml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("write", &tmp))?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &f.config).map_err(io_err("write", &f.config))
}

/// YAML for the registry. Values are JSON strings, which YAML reads as
/// they are: no quoting of a password can go wrong.
fn config_text(
    cfg: &CacheConfig,
    password: Option<&str>,
    storage: &Path,
    addr: SocketAddrV4,
) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mut out = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         \x20 maintenance:\n    uploadpurging:\n      enabled: true\n      age: 2h\n      interval: 1h\n      dryrun: false\n\
         http:\n  addr: {}\n  headers:\n    X-Content-Type-Options: [nosniff]\n\
         proxy:\n  remoteurl: {}\n",
        q(&storage.display().to_string()),
        q(&addr.to_string()),
        q(cfg.upstream.trim_end_matches('/')),
    );
    if let (Some(u), Some(p)) = (&cfg.username, password) {
        out += &format!("  username: {}\n  password: {}\n", q(u), q(p));
    }
    out
}

fn spawn(registry: &Path, f: &Files) -> Result<Child, CacheError> {
    rotate_log(&f.log);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&f.log)
        .map_err(io_err("open", &f.log))?;
    let mut cmd = Command::new(registry);
    cmd.arg("serve")
        .arg(&f.config)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_err("open", &f.log))?)
        .stderr(log);
    // It goes with the supervisor, even when the agent is killed.
    sys::die_with_parent(&mut cmd);
    let child = cmd.spawn().map_err(|source| CacheError::Spawn {
        path: registry.into(),
        source,
    })?;
    std::fs::write(&f.pid, child.id().to_string()).map_err(io_err("write", &f.pid))?;
    Ok(child)
}

fn rotate_log(log: &Path) {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_KEEP_BYTES) {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
}

/// Waits until the registry accepts connections.
fn ready(mut child: Child, addr: SocketAddrV4, f: &Files) -> Result<Child, CacheError> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500)).is_ok() {
            return Ok(child);
        }
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&f.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            return Err(CacheError::NotReady {
                addr,
                secs: READY_WITHIN.as_secs(),
                log: f.log.clone(),
                tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restarts the registry when it exits (with backoff), evicts when the
/// storage passes its high-water mark, stops it when the cache is dropped.
fn supervise(
    mut child: Option<Child>,
    registry: &Path,
    f: Files,
    addr: SocketAddrV4,
    bound: u64,
    stop: mpsc::Receiver<()>,
) {
    const CAP: Duration = Duration::from_secs(60);
    let mut failures = u32::from(child.is_none());
    let mut retry_at = child
        .is_none()
        .then(|| Instant::now() + backoff(failures, CAP));
    // Until the cache is dropped (its sender with it).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(TICK) {
        if let Some(c) = &mut child
            && let Ok(Some(status)) = c.try_wait()
        {
            child = None;
            failures += 1;
            let wait = backoff(failures, CAP);
            tracing::error!(%status, failures, retry_in_s = wait.as_secs(), log = %f.log.display(), "the cache's registry exited; jobs pull from their other mirrors or the upstream meanwhile");
            retry_at = Some(Instant::now() + wait);
        }
        if let Some(used) = used_bytes(&f.storage)
            && used as f64 > bound as f64 * HIGH_WATER
        {
            if let Some(mut c) = child.take() {
                stop_child(&mut c);
            }
            let freed = evict(&f.storage, used, (bound as f64 * LOW_WATER) as u64);
            tracing::info!(
                used,
                freed,
                bound,
                "the cache passed its high-water mark: least recently used blobs evicted"
            );
            retry_at = Some(Instant::now());
        }
        if child.is_none() && retry_at.is_some_and(|t| Instant::now() >= t) {
            match spawn(registry, &f).and_then(|c| ready(c, addr, &f)) {
                Ok(c) => {
                    tracing::info!(%addr, "pull-through cache serving every job");
                    child = Some(c);
                    retry_at = None;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures, CAP);
                    tracing::error!(error = %e, failures, retry_in_s = wait.as_secs(), "cannot restart the cache's registry");
                    retry_at = Some(Instant::now() + wait);
                }
            }
        }
    }
    if let Some(mut c) = child {
        stop_child(&mut c);
    }
    let _ = std::fs::remove_file(&f.pid);
}

/// SIGTERM, a moment to finish writes, then SIGKILL.
fn stop_child(child: &mut Child) {
    let _ = sys::kill(child.id() as i32, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Bytes in use on the storage's filesystem.
fn used_bytes(storage: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(storage).ok()?;
    Some((s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64)
}

/// A blob in the registry's storage: its directory, size and last use.
#[derive(Debug)]
struct Blob {
    dir: PathBuf,
    bytes: u64,
    used: SystemTime,
}

/// The blobs below `storage`, least recently used first. A read marks a
/// blob used (relatime: at least once a day, and at the first read after a
/// write); so does a write.
fn blobs(storage: &Path) -> Vec<Blob> {
    let root = storage.join("docker/registry/v2/blobs/sha256");
    let mut out = Vec::new();
    for prefix in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for blob in std::fs::read_dir(prefix.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(m) = std::fs::metadata(blob.path().join("data")) else {
                continue;
            };
            let (a, w) = (
                m.accessed().unwrap_or(SystemTime::UNIX_EPOCH),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            );
            out.push(Blob {
                dir: blob.path(),
                bytes: m.len(),
                used: a.max(w),
            });
        }
    }
    out.sort_by_key(|b| b.used);
    out
}

/// Removes blobs, least recently used first, until about `target` bytes
/// are in use (from `used`); returns the bytes freed. The registry is
/// stopped meanwhile. A manifest whose layers went is fetched again from the
/// upstream: in proxy mode a blob missing here is a miss, never an error.
fn evict(storage: &Path, used: u64, target: u64) -> u64 {
    let mut freed = 0;
    for b in blobs(storage) {
        if used.saturating_sub(freed) <= target {
            break;
        }
        if std::fs::remove_dir_all(&b.dir).is_ok() {
            freed += b.bytes;
        }
    }
    // Uploads cut short by the stop.
    let repos = storage.join("docker/registry/v2/repositories");
    remove_uploads(&repos, 0);
    freed
}

fn remove_uploads(dir: &Path, depth: u32) {
    if depth > 8 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name() == "_uploads" {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            remove_uploads(&p, depth + 1);
        }
    }
}

/// The cache's address for a pool: the host end of the pool's last /30,
/// which no job then gets.
pub fn addr_in_pool(pool: Ipv4Addr, prefix: u8) -> SocketAddrV4 {
    let size = 1u32 << (32 - u32::from(prefix));
    SocketAddrV4::new(Ipv4Addr::from(u32::from(pool) + size - 4 + 1), PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_the_last_net_of_the_pool() {
        assert_eq!(
            addr_in_pool(Ipv4Addr::new(10, 213, 0, 0), 16),
            "10.213.255.253:5000".parse().unwrap()
        );
        assert_eq!(
            addr_in_pool(Ipv4Addr::new(10, 1, 2, 0), 28),
            "10.1.2.13:5000".parse().unwrap()
        );
    }

    #[test]
    fn config_is_validated_key_by_key() {
        CacheConfig::default().validate().unwrap();
        let bad = |c: CacheConfig, key: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        bad(
            CacheConfig {
                upstream: "registry-1.docker.io".into(),
                ..Default::default()
            },
            "cache.upstream",
        );
        bad(
            CacheConfig {
                upstream: "https://u:p@registry.example".into(),
                ..Default::default()
            },
            "cache.upstream",
        );
        bad(
            CacheConfig {
                upstream: "https://registry.example/v2/".into(),
                ..Default::default()
            },
            "cache.upstream",
        );
        let small = CacheConfig {
            max_bytes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(
            small.validate().unwrap_err().to_string(),
            "cache.max_bytes: 1048576 is below 256 MiB (268435456)"
        );
        bad(
            CacheConfig {
                username: Some("ci".into()),
                ..Default::default()
            },
            "cache.password_file",
        );
        bad(
            CacheConfig {
                username: Some("ci".into()),
                password_file: Some("/nonexistent/berth-pw".into()),
                ..Default::default()
            },
            "cache.password_file",
        );
        let dir = std::env::temp_dir().join(format!("berth-cache-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cr\"et: x\n").unwrap();
        let c = CacheConfig {
            username: Some("ci".into()),
            password_file: Some(pw.clone()),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap().as_deref(), Some("s3cr\"et: x"));
        bad(
            CacheConfig {
                username: Some("c:i".into()),
                ..c.clone()
            },
            "cache.username",
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_registrys_config_quotes_every_value() {
        let c = CacheConfig {
            upstream: "https://registry.example:5443/".into(),
            username: Some("ci".into()),
            ..Default::default()
        };
        let text = config_text(
            &c,
            Some("p\"w: #x"),
            Path::new("/var/lib/berth/cache/storage"),
            "10.213.255.253:5000".parse().unwrap(),
        );
        assert!(
            text.contains("  remoteurl: \"https://registry.example:5443\"\n"),
            "{text}"
        );
        assert!(text.contains("  addr: \"10.213.255.253:5000\"\n"), "{text}");
        assert!(text.contains("  password: \"p\\\"w: #x\"\n"), "{text}");
        let none = config_text(
            &CacheConfig::default(),
            None,
            Path::new("/s"),
            "10.0.0.1:5000".parse().unwrap(),
        );
        assert!(!none.contains("password"));
    }

    #[test]
    fn eviction_takes_the_least_recently_used_blobs_first() {
        let root = std::env::temp_dir().join(format!("berth-cache-evict-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let blobs_dir = root.join("docker/registry/v2/blobs/sha256");
        let now = SystemTime::now();
        // Four blobs of 100 bytes, last used 4, 3, 2 and 1 hours ago.
        for (i, name) in ["aa11", "bb22", "cc33", "dd44"].iter().enumerate() {
            let d = blobs_dir.join(&name[..2]).join(name);
            std::fs::create_dir_all(&d).unwrap();
            let f = std::fs::File::create(d.join("data")).unwrap();
            f.set_len(100).unwrap();
            let t = now - Duration::from_secs(3600 * (4 - i as u64));
            f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
                .unwrap();
        }
        let uploads = root.join("docker/registry/v2/repositories/library/x/_uploads/u1");
        std::fs::create_dir_all(&uploads).unwrap();
        // 400 in use, down to 250: the two oldest go.
        let freed = evict(&root, 400, 250);
        assert_eq!(freed, 200);
        let left: Vec<String> = blobs(&root)
            .iter()
            .map(|b| b.dir.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["cc33", "dd44"]);
        assert!(!uploads.exists());
        assert!(
            root.join("docker/registry/v2/repositories/library/x")
                .exists()
        );
        // Already below the target: nothing goes.
        assert_eq!(evict(&root, 200, 250), 0);
        let _ = std::fs::remove_dir_all(&root);
    }
}
