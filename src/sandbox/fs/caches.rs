//! Warm starts per project: the key store (docs/caches.md).
//!
//! A key's state is a job disk (an ext4 image) that a job of the key
//! committed. The store keeps, per key, a directory named by the SHA-256 of
//! the key's text, holding committed generations (`gen-*.img`, each with
//! its `gen-*.json`) and `current`, a symbolic link to one of them,
//! replaced by rename.
//! A job of the key gets a reflink copy of `current`: its blocks are shared
//! until either side writes them, so the copy takes the same time whatever
//! the key holds. Every change is a rename: a crash leaves each key at its
//! old state or its new one, and [`Store::open`] removes what no `current`
//! names.
//!
//! Generations are taken under the key's lock file: exclusive for a commit
//! or a removal, shared for a copy, so a copy never opens a generation a
//! commit is deleting.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::locks::Lock;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The longest key berth takes (a repository name and a branch fit many
/// times over).
pub const MAX_KEY_LEN: usize = 256;

const CURRENT: &str = "current";
const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache key {0:?}: {1}")]
    BadKey(String, &'static str),
    #[error("cache store: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cache key {key}: the job's disk holds {bytes} bytes, above bytes_per_key ({bound}); \
         the key keeps its state"
    )]
    TooLarge { key: Key, bytes: u64, bound: u64 },
    #[error("cache store: cannot run {tool}: {source} (apt-get install xfsprogs)")]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("cache store: {tool} failed for {path}: {stderr}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error(
        "cache store: {path}: this filesystem cannot share blocks between files \
         (reflink): {source}; put the store on XFS (mkfs.xfs -m reflink=1) or btrfs"
    )]
    NoReflink {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.into(),
        source,
    }
}

/// A cache key: what a job names its project's state by (a repository,
/// a repository and branch). Printable, at most [`MAX_KEY_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    pub fn new(text: impl Into<String>) -> Result<Key, CacheError> {
        let text = text.into();
        if text.is_empty() {
            return Err(CacheError::BadKey(text, "is empty"));
        }
        if text.len() > MAX_KEY_LEN {
            return Err(CacheError::BadKey(text, "is longer than 256 bytes"));
        }
        if text.chars().any(char::is_control) {
            return Err(CacheError::BadKey(text, "holds a control character"));
        }
        Ok(Key(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's directory name: its SHA-256, so that no key's text is a
    /// path and no two keys share a directory.
    fn dir_name(&self) -> String {
        Sha256::digest(self.0.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl TryFrom<String> for Key {
    type Error = CacheError;
    fn try_from(s: String) -> Result<Key, CacheError> {
        Key::new(s)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the store knows of a key's current state (its generation's
/// `.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub key: Key,
    /// Unix seconds of the last copy or commit.
    pub last_used: u64,
    /// Unix seconds of the commit `current` names.
    pub committed_at: u64,
    /// The job that made it.
    pub committed_by: String,
    /// Bytes its image takes on the host (allocated blocks).
    pub bytes: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes a file takes on its filesystem (allocated blocks; a reflink copy
/// counts its shared blocks too).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The store: a root-owned 0700 directory on a filesystem that can share
/// blocks between files.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

/// What [`Store::open`] removed: files a crash left between two renames.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub removed: Vec<PathBuf>,
}

impl Store {
    /// Opens (making it if needed) the store at `dir` and removes what an
    /// interrupted commit or removal left.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), CacheError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let store = Store { dir: dir.into() };
        let recovered = store.recover()?;
        Ok((store, recovered))
    }

    fn key_dir(&self, key: &Key) -> PathBuf {
        self.dir.join(key.dir_name())
    }

    fn lock(&self, key_dir: &Path, arg: FlockArg) -> Result<Flock<std::fs::File>, CacheError> {
        let path = key_dir.join(LOCK);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Flock::lock(f, arg).map_err(|(_, e)| CacheError::Io {
            path,
            source: e.into(),
        })
    }

    /// The generation `current` names, if the key has one.
    fn current_in(key_dir: &Path) -> Option<PathBuf> {
        let target = std::fs::read_link(key_dir.join(CURRENT)).ok()?;
        // Only a bare file name of this directory: nothing else made it.
        let name = target.file_name()?;
        (target.as_os_str() == name).then(|| key_dir.join(name))
    }

    /// The current generation's information.
    fn read_info(key_dir: &Path) -> Option<KeyInfo> {
        let current = Self::current_in(key_dir)?;
        let text = std::fs::read(current.with_extension("json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_info(generation: &Path, info: &KeyInfo) -> Result<(), CacheError> {
        let path = generation.with_extension("json");
        let text = serde_json::to_vec_pretty(info).expect("KeyInfo serializes");
        crate::files::write_atomic(&path, &text, 0o600).map_err(io(&path))
    }

    /// Copies the key's current state to `dest` (a new file) by sharing its
    /// blocks; false (and nothing made) when the key has no state yet.
    pub fn copy_current(&self, key: &Key, dest: &Path) -> Result<bool, CacheError> {
        let key_dir = self.key_dir(key);
        if !key_dir.is_dir() {
            return Ok(false);
        }
        let _shared = self.lock(&key_dir, FlockArg::LockShared)?;
        let Some(current) = Self::current_in(&key_dir) else {
            return Ok(false);
        };
        let src = std::fs::File::open(&current).map_err(io(&current))?;
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(io(dest))?;
        if let Err(e) = super::super::sys::reflink(&src, &dst) {
            drop(dst);
            let _ = std::fs::remove_file(dest);
            return Err(CacheError::NoReflink {
                path: dest.into(),
                source: e,
            });
        }
        if let Some(mut info) = Self::read_info(&key_dir) {
            info.last_used = unix_now();
            Self::write_info(&current, &info)?;
        }
        Ok(true)
    }

    /// Makes `image` (a job's cleanly unmounted disk, on the store's
    /// filesystem) the key's current state, whole: moved into the key as a
    /// new generation, then `current` replaced by rename. Of two commits at
    /// once, the later one's rename wins. Older generations go.
    pub fn commit(&self, key: &Key, image: &Path, job: &str) -> Result<KeyInfo, CacheError> {
        let key_dir = self.key_dir(key);
        std::fs::create_dir_all(&key_dir).map_err(io(&key_dir))?;
        std::fs::set_permissions(&key_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&key_dir))?;
        let _exclusive = self.lock(&key_dir, FlockArg::LockExclusive)?;
        std::fs::File::open(image)
            .and_then(|f| f.sync_all())
            .map_err(io(image))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let gen_name = format!("gen-{}-{job}.img", now.as_nanos());
        let generation = key_dir.join(&gen_name);
        std::fs::rename(image, &generation).map_err(io(image))?;
        sync_dir(&key_dir)?;
        let info = KeyInfo {
            key: key.clone(),
            last_used: now.as_secs(),
            committed_at: now.as_secs(),
            committed_by: job.into(),
            bytes: allocated(&generation),
        };
        Self::write_info(&generation, &info)?;
        let link_tmp = key_dir.join(format!("{CURRENT}.tmp-{job}"));
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(&gen_name, &link_tmp).map_err(io(&link_tmp))?;
        std::fs::rename(&link_tmp, key_dir.join(CURRENT)).map_err(io(&link_tmp))?;
        sync_dir(&key_dir)?;
        Self::remove_stale(&key_dir)?;
        Ok(info)
    }

    /// Removes every file of the key's directory that `current` does not
    /// need: other generations and their information, temporary links.
    fn remove_stale(key_dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
        let current = Self::current_in(key_dir);
        let stem = current
            .as_deref()
            .and_then(Path::file_stem)
            .map(|s| s.to_os_string());
        let mut removed = Vec::new();
        for e in std::fs::read_dir(key_dir).map_err(io(key_dir))?.flatten() {
            let name = e.file_name();
            let stale = match name.to_string_lossy().as_ref() {
                CURRENT | LOCK => false,
                n if n.starts_with("gen-") => e.path().file_stem() != stem.as_deref(),
                _ => true,
            };
            if stale {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                removed.push(e.path());
            }
        }
        Ok(removed)
    }

    /// Removes what a crash left: in each key, what `current` does not
    /// name; a key without `current`, whole.
    fn recover(&self) -> Result<Recovered, CacheError> {
        let mut out = Recovered::default();
        for e in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            let key_dir = e.path();
            if !key_dir.is_dir() {
                continue;
            }
            let _exclusive = self.lock(&key_dir, FlockArg::LockExclusive)?;
            out.removed.extend(Self::remove_stale(&key_dir)?);
            if Self::current_in(&key_dir).is_none() {
                std::fs::remove_dir_all(&key_dir).map_err(io(&key_dir))?;
                out.removed.push(key_dir);
            }
        }
        out.removed.sort();
        Ok(out)
    }

    /// Every key with a state, least recently used first.
    pub fn list(&self) -> Result<Vec<KeyInfo>, CacheError> {
        let mut out: Vec<KeyInfo> = std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
            .filter(|e| Self::current_in(&e.path()).is_some())
            .filter_map(|e| Self::read_info(&e.path()))
            .collect();
        out.sort_by(|a, b| (a.last_used, a.key.as_str()).cmp(&(b.last_used, b.key.as_str())));
        Ok(out)
    }

    /// Removes the key and its state; false when it had none. Jobs running
    /// from a copy keep their copy.
    pub fn remove(&self, key: &Key) -> Result<bool, CacheError> {
        let key_dir = self.key_dir(key);
        if !key_dir.is_dir() {
            return Ok(false);
        }
        let _exclusive = self.lock(&key_dir, FlockArg::LockExclusive)?;
        let had = Self::current_in(&key_dir).is_some();
        // `current` first: from here on, a crash leaves a key without
        // state, which recovery removes.
        match std::fs::remove_file(key_dir.join(CURRENT)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&key_dir)(e)),
        }
        sync_dir(&key_dir)?;
        std::fs::remove_dir_all(&key_dir).map_err(io(&key_dir))?;
        Ok(had)
    }

    /// Removes least recently used keys until the store's keys take at
    /// most `total_bytes`, never one in `keep`; returns those removed.
    pub fn evict(
        &self,
        total_bytes: u64,
        keep: &std::collections::HashSet<Key>,
    ) -> Result<Vec<KeyInfo>, CacheError> {
        let keys = self.list()?;
        let mut total: u64 = keys.iter().map(|k| k.bytes).sum();
        let mut evicted = Vec::new();
        for k in keys {
            if total <= total_bytes {
                break;
            }
            if keep.contains(&k.key) {
                continue;
            }
            if self.remove(&k.key)? {
                total = total.saturating_sub(k.bytes);
                evicted.push(k);
            }
        }
        Ok(evicted)
    }
}

/// `[project_caches]` of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectCachesConfig {
    /// Whether jobs may name a cache key.
    pub enabled: bool,
    /// Bound on what the store's keys take together; least recently used
    /// keys go past it. Also the size of the store's own XFS filesystem
    /// where the state dir's cannot share blocks.
    pub total_bytes: u64,
    /// Bound on one key's state: a larger commit is refused and the key
    /// keeps what it had.
    pub bytes_per_key: u64,
}

impl Default for ProjectCachesConfig {
    fn default() -> Self {
        ProjectCachesConfig {
            enabled: false,
            total_bytes: 100 << 30,
            bytes_per_key: 20 << 30,
        }
    }
}

/// Where keyed jobs' disks and the key store live: one filesystem that
/// shares blocks between files, so a job's copy of a key is a reflink and
/// its commit a rename. `<state>/project-caches`, on the state dir's own
/// filesystem where it can (XFS, btrfs), else on an XFS filesystem in
/// `<state>/project-caches.img` that the agent makes and mounts.
#[derive(Debug)]
pub struct Pool {
    pub store: Store,
    jobs: PathBuf,
    total_bytes: u64,
    bytes_per_key: u64,
    /// The XFS image the agent made and mounted here, when the state dir
    /// cannot share blocks: it grows as keyed jobs need room.
    image: Option<(PathBuf, PathBuf)>,
    /// The disk bound of each keyed job whose disk is in the pool.
    reserved: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// What the pool's own filesystem takes beside its files (XFS's log and
/// allocation groups' headers).
const POOL_SLACK: u64 = 1 << 30;

impl Pool {
    pub fn open(state_dir: &Path, cfg: &ProjectCachesConfig) -> Result<Pool, CacheError> {
        let dir = state_dir.join("project-caches");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let mut made = None;
        if reflinks(&dir).is_err() {
            let image = state_dir.join("project-caches.img");
            if !image.exists() {
                // Sparse: the keys' bound and the slack now, more as keyed
                // jobs start (see `reserve`).
                make_xfs(&image, cfg.total_bytes + POOL_SLACK)?;
            }
            if !is_mount_point(&dir) {
                let out = std::process::Command::new("mount")
                    .args(["-t", "xfs", "-o", "loop"])
                    .arg(&image)
                    .arg(&dir)
                    .output()
                    .map_err(io(&image))?;
                if !out.status.success() {
                    return Err(CacheError::Tool {
                        tool: "mount",
                        path: image,
                        stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
                    });
                }
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&dir))?;
            reflinks(&dir)?;
            made = Some((image, dir.clone()));
        }
        let jobs = dir.join("jobs");
        std::fs::create_dir_all(&jobs).map_err(io(&jobs))?;
        std::fs::set_permissions(&jobs, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&jobs))?;
        // A disk on its way to a commit when an earlier agent stopped: the
        // key keeps its state.
        for e in std::fs::read_dir(&jobs).map_err(io(&jobs))?.flatten() {
            if e.path().extension().is_some_and(|x| x == "commit") {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
            }
        }
        let (store, recovered) = Store::open(&dir.join("keys"))?;
        for p in &recovered.removed {
            tracing::info!(path = %p.display(), "project cache: removed what an interrupted commit left");
        }
        Ok(Pool {
            store,
            jobs,
            total_bytes: cfg.total_bytes,
            bytes_per_key: cfg.bytes_per_key,
            image: made,
            reserved: Default::default(),
        })
    }

    /// Room for keyed job `id`'s disk of `bytes`: the agent's image grows
    /// (sparse, online) until the keys' bound and every running keyed
    /// job's disk bound fit together, so that no job meets a full pool
    /// before its own bound. Nothing to do where the state dir itself
    /// shares blocks: its free space is the host's.
    pub fn reserve(&self, id: &str, bytes: u64) -> Result<(), CacheError> {
        let mut reserved = self.reserved.locked();
        reserved.insert(id.into(), bytes);
        let Some((image, mount)) = &self.image else {
            return Ok(());
        };
        let want = self.total_bytes + POOL_SLACK + reserved.values().sum::<u64>();
        let grown = grow_xfs(image, mount, want);
        if grown.is_err() {
            reserved.remove(id);
        }
        grown
    }

    /// Job `id`'s disk has left the pool. The image keeps its size (XFS
    /// does not shrink); its freed blocks serve the next jobs.
    pub fn release(&self, id: &str) {
        self.reserved.locked().remove(id);
    }

    /// The pool filesystem's size (bytes).
    pub fn size(&self) -> Result<u64, CacheError> {
        let dir = self.jobs.parent().unwrap_or(&self.jobs);
        let st = nix::sys::statvfs::statvfs(dir).map_err(|e| io(dir)(e.into()))?;
        Ok(st.blocks() * st.fragment_size())
    }

    /// Commits `image` to `key` within the store's bounds: a state larger
    /// than `bytes_per_key` is refused (the key keeps what it had); past
    /// `total_bytes`, least recently used other keys go.
    pub fn commit(
        &self,
        key: &Key,
        image: &Path,
        job: &str,
    ) -> Result<(KeyInfo, Vec<KeyInfo>), CacheError> {
        let bytes = allocated(image);
        if bytes > self.bytes_per_key {
            return Err(CacheError::TooLarge {
                key: key.clone(),
                bytes,
                bound: self.bytes_per_key,
            });
        }
        let info = self.store.commit(key, image, job)?;
        let evicted = self.store.evict(self.total_bytes, &[key.clone()].into())?;
        Ok((info, evicted))
    }

    /// Where job `id`'s disk image is, when the job has a cache key.
    pub fn job_image(&self, id: &str) -> PathBuf {
        self.jobs.join(format!("{id}.img"))
    }
}

/// A sparse file of `bytes` with an XFS filesystem that shares blocks.
fn make_xfs(image: &Path, bytes: u64) -> Result<(), CacheError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(io(image))?;
    f.set_len(bytes).map_err(io(image))?;
    drop(f);
    let out = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(image)
        .output()
        .map_err(|source| CacheError::Spawn {
            tool: "mkfs.xfs",
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(CacheError::Tool {
            tool: "mkfs.xfs",
            path: image.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(())
}

/// Grows the XFS in `image`, mounted (through a loop device) on `mount`,
/// to `bytes` if it is smaller: the file first, then the loop device's
/// idea of it, then the filesystem.
fn grow_xfs(image: &Path, mount: &Path, bytes: u64) -> Result<(), CacheError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(io(image))?;
    if f.metadata().map_err(io(image))?.len() >= bytes {
        return Ok(());
    }
    f.set_len(bytes).map_err(io(image))?;
    drop(f);
    let run = |tool: &'static str, args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .map_err(|source| CacheError::Spawn { tool, source })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(CacheError::Tool {
                tool,
                path: image.into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
            })
        }
    };
    // `/dev/loopN: [dev]:inode (path)`, one line per device on the file.
    let listed = run("losetup", &["-j".as_ref(), image.as_os_str()])?;
    for device in listed.lines().filter_map(|l| l.split(':').next()) {
        run("losetup", &["-c".as_ref(), device.as_ref()])?;
    }
    run("xfs_growfs", &["-d".as_ref(), mount.as_os_str()])?;
    tracing::info!(image = %image.display(), bytes, "project caches: the pool grew");
    Ok(())
}

/// Whether `dir` is the root of a mount (its device differs from its
/// parent's).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

/// Whether the filesystem holding `dir` shares blocks between files: one
/// small file copied by reflink there, then both removed.
pub fn reflinks(dir: &Path) -> Result<(), CacheError> {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = a.with_extension("copy");
    let result = (|| {
        std::fs::write(&a, b"berth").map_err(io(&a))?;
        let src = std::fs::File::open(&a).map_err(io(&a))?;
        let dst = std::fs::File::create(&b).map_err(io(&b))?;
        super::super::sys::reflink(&src, &dst).map_err(|source| CacheError::NoReflink {
            path: dir.into(),
            source,
        })
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempdir::Dir, Store) {
        let d = tempdir::Dir::new();
        let (s, r) = Store::open(&d.0.join("keys")).unwrap();
        assert!(r.removed.is_empty());
        (d, s)
    }

    /// A throwaway directory, removed on drop.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "berth-caches-{}-{:x}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn image(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn current_text(s: &Store, key: &Key) -> Option<String> {
        Store::current_in(&s.key_dir(key)).map(|p| std::fs::read_to_string(p).unwrap())
    }

    #[test]
    fn keys_are_printable_bounded_and_never_a_path() {
        assert!(Key::new("").is_err());
        assert!(Key::new("a\nb").is_err());
        assert!(Key::new("x".repeat(257)).is_err());
        let k = Key::new("../../etc/passwd").unwrap();
        assert_eq!(k.dir_name().len(), 64);
        assert!(k.dir_name().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(
            Key::new("org/app").unwrap().dir_name(),
            Key::new("org/app ").unwrap().dir_name()
        );
        let json: Result<Key, _> = serde_json::from_str("\"\"");
        assert!(json.is_err());
    }

    #[test]
    fn a_commit_becomes_the_keys_state_and_the_later_of_two_wins_whole() {
        let (d, s) = store();
        let key = Key::new("org/app").unwrap();
        assert_eq!(current_text(&s, &key), None);
        let info = s
            .commit(&key, &image(&d.0, "a.img", "first"), "job-a")
            .unwrap();
        assert_eq!(info.committed_by, "job-a");
        assert_eq!(current_text(&s, &key).as_deref(), Some("first"));
        s.commit(&key, &image(&d.0, "b.img", "second"), "job-b")
            .unwrap();
        assert_eq!(current_text(&s, &key).as_deref(), Some("second"));
        // One generation left: the older one went with the commit.
        let gens = std::fs::read_dir(s.key_dir(&key))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
            .count();
        assert_eq!(gens, 2, "one generation, its image and its information");
        assert_eq!(s.list().unwrap()[0].committed_by, "job-b");
    }

    #[test]
    fn concurrent_commits_leave_one_whole_state() {
        let (d, s) = store();
        let s = std::sync::Arc::new(s);
        let key = Key::new("org/app").unwrap();
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (s, key) = (s.clone(), key.clone());
                let img = image(&d.0, &format!("{i}.img"), &format!("state-{i}"));
                std::thread::spawn(move || s.commit(&key, &img, &format!("job-{i}")).unwrap())
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let text = current_text(&s, &key).unwrap();
        assert!(text.starts_with("state-"), "{text}");
        let names: Vec<String> = std::fs::read_dir(s.key_dir(&key))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".img") || n.contains(".tmp"))
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn recovery_leaves_each_key_at_its_old_or_new_state() {
        let (d, s) = store();
        let key = Key::new("org/app").unwrap();
        s.commit(&key, &image(&d.0, "a.img", "old"), "job-a")
            .unwrap();
        let kd = s.key_dir(&key);
        // A crash after the new generation was moved in, before `current`
        // was replaced; and one while the new link was being made.
        std::fs::write(kd.join("gen-99-job-b.img"), "new").unwrap();
        std::fs::write(kd.join("gen-99-job-b.json"), "{}").unwrap();
        std::os::unix::fs::symlink("gen-99-job-b.img", kd.join("current.tmp-job-b")).unwrap();
        // A key whose first commit never got its `current`.
        let half = Key::new("org/other").unwrap();
        std::fs::create_dir_all(s.key_dir(&half)).unwrap();
        std::fs::write(s.key_dir(&half).join("gen-1-job-c.img"), "x").unwrap();
        drop(s);
        let (s, r) = Store::open(&d.0.join("keys")).unwrap();
        assert_eq!(current_text(&s, &key).as_deref(), Some("old"));
        // Job b's generation, its information and link; the half key's
        // generation, then the key itself.
        assert_eq!(r.removed.len(), 5, "{:?}", r.removed);
        assert!(!s.key_dir(&half).exists());
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn removal_and_eviction_take_least_recently_used_keys_first() {
        let (d, s) = store();
        let keys: Vec<Key> = ["a", "b", "c"]
            .iter()
            .map(|k| Key::new(*k).unwrap())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let img = image(&d.0, &format!("{i}.img"), &"x".repeat(8192));
            s.commit(k, &img, "job").unwrap();
            let kd = s.key_dir(k);
            let mut info = Store::read_info(&kd).unwrap();
            info.last_used = 100 + i as u64;
            Store::write_info(&Store::current_in(&kd).unwrap(), &info).unwrap();
        }
        let each = s.list().unwrap()[0].bytes;
        assert!(each > 0);
        let keep: std::collections::HashSet<Key> = [keys[0].clone()].into();
        let evicted = s.evict(each * 2, &keep).unwrap();
        assert_eq!(
            evicted.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert!(s.remove(&keys[2]).unwrap());
        assert!(!s.remove(&keys[2]).unwrap());
        assert_eq!(
            s.list()
                .unwrap()
                .iter()
                .map(|k| k.key.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
    }
}
