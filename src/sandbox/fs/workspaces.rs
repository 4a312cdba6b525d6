//! Workspaces: host directories a job asks for (a CI checkout, Jenkins'
//! `DIR@tmp` beside it), checked against what the agent allows and bound
//! into the job's root at their own path. Ownership goes through an
//! idmapped mount that maps exactly one job uid (and gid) to the
//! directory's owner: what the job writes there as that id lands on the
//! host as the owner's, and it can write as no one else.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::super::sys;
use super::idmap::{IdmapError, IdmapNs};

/// The `[workspaces]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspacesConfig {
    /// Directories below which jobs may ask for workspaces. Empty: no job
    /// gets a workspace.
    #[serde(default)]
    pub allowed_roots: Vec<PathBuf>,
}

/// A workspace a job asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRequest {
    /// The directory, on the agent's host; the job sees it at this path.
    pub path: PathBuf,
    /// The job uid whose writes land as the directory's owner: by default
    /// the owner's own uid number (`docker run -u $(id -u):$(id -g)`, as
    /// Jenkins does); 0 for tools that run as root in their containers
    /// (GitHub Actions' `container:` jobs).
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_uid: Option<u32>,
}

impl FromStr for WorkspaceRequest {
    type Err = String;

    /// `DIR`, `DIR:root` or `DIR:UID`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, as_uid) = match s.rsplit_once(':') {
            Some((p, "root")) => (p, Some(0)),
            Some((p, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                (p, Some(n.parse().map_err(|_| format!("{n}: not a uid"))?))
            }
            _ => (s, None),
        };
        if !Path::new(path).is_absolute() {
            return Err(format!(
                "{path}: a workspace is an absolute path (DIR, DIR:root or DIR:UID)"
            ));
        }
        Ok(WorkspaceRequest {
            path: path.into(),
            as_uid,
        })
    }
}

/// A workspace checked and ready to be mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    /// Where the job sees it: the path asked for.
    pub at: PathBuf,
    /// The directory on the host, every link resolved.
    pub dir: PathBuf,
    /// Its owner on the host.
    pub owner: (u32, u32),
    /// The job's uid and gid that are that owner.
    pub in_job: (u32, u32),
    /// Device and inode of the directory checked: the one mounted.
    pub id: (u64, u64),
}

impl Workspace {
    /// The id maps (`uid_map`, `gid_map` lines) of the user namespace its
    /// idmapped mount is made with, for a job whose ids start at `first`
    /// on the host: the owner's on-disk ids appear as the job's.
    pub fn idmap(&self, first: u32) -> (String, String) {
        (
            format!("{} {} 1\n", self.owner.0, first + self.in_job.0),
            format!("{} {} 1\n", self.owner.1, first + self.in_job.1),
        )
    }

    /// A detached, writable clone of the directory's mount, idmapped
    /// through `ns` (made from [`Workspace::idmap`]). The directory is
    /// opened again without following any link and must be the one checked.
    fn mount_with(&self, ns: &IdmapNs) -> Result<std::os::fd::OwnedFd, WorkspaceError> {
        let changed = || WorkspaceError::Refused {
            path: self.at.clone(),
            why: Refusal::Changed,
        };
        let dir = sys::open_dir_nofollow(&self.dir, true).map_err(|_| changed())?;
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&dir)).map_err(|e| {
            WorkspaceError::Io {
                path: self.dir.clone(),
                source: e.into(),
            }
        })?;
        if (st.st_dev, st.st_ino) != self.id || (st.st_uid, st.st_gid) != self.owner {
            return Err(changed());
        }
        sys::idmapped_clone(std::os::fd::AsFd::as_fd(&dir), &self.dir, ns.fd(), false).map_err(
            |source| WorkspaceError::NoIdmap {
                path: self.dir.clone(),
                fs: fs_name(&self.dir),
                source,
            },
        )
    }
}

/// The idmapped mounts of `ws` for the job whose ids start at `first` on
/// the host, in order: one user namespace for each distinct id map (a
/// workspace and its `DIR@tmp` share one).
pub fn mounts_for(
    ws: &[Workspace],
    first: u32,
) -> Result<Vec<std::os::fd::OwnedFd>, WorkspaceError> {
    let mut maps: Vec<((String, String), IdmapNs)> = Vec::new();
    let mut out = Vec::with_capacity(ws.len());
    for w in ws {
        let map = w.idmap(first);
        let i = match maps.iter().position(|(m, _)| *m == map) {
            Some(i) => i,
            None => {
                let ns = IdmapNs::new(&map.0, &map.1)?;
                maps.push((map, ns));
                maps.len() - 1
            }
        };
        out.push(w.mount_with(&maps[i].1)?);
    }
    Ok(out)
}

/// Why a workspace is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("this agent allows no workspaces (set [workspaces] allowed_roots)")]
    NoneAllowed,
    #[error("it is not below any of [workspaces] allowed_roots ({0})")]
    NotAllowed(String),
    #[error("it is the root directory")]
    Root,
    #[error("it is or holds a system directory ({0})")]
    System(PathBuf),
    #[error("it overlaps the agent's state directory ({0})")]
    AgentState(PathBuf),
    #[error("it overlaps {at}, a workspace of live job {job}")]
    InUse { at: PathBuf, job: String },
    #[error("it is owned by root (uid {0}, gid {1}): a job's writes would land as root's")]
    RootOwned(u32, u32),
    #[error("its owner (uid {0}) is one of the job ids berth hands out")]
    JobOwned(u32),
    #[error("its owner's uid {0} is beyond a job's ids (0-{max}); ask for DIR:root or DIR:UID", max = super::super::config::RANGE_SIZE - 1)]
    OwnerOutOfRange(u32),
    #[error("uid {0} is beyond a job's ids (0-{max})", max = super::super::config::RANGE_SIZE - 1)]
    UidOutOfRange(u32),
    #[error("it is not a directory")]
    NotADirectory,
    #[error("it changed (moved, replaced or given away) while it was being mounted")]
    Changed,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace {path} refused: {why}")]
    Refused { path: PathBuf, why: Refusal },
    #[error("workspace {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Idmap(#[from] IdmapError),
    #[error(
        "workspace {path}: its filesystem ({fs}) on kernel {kernel} cannot make idmapped mounts \
         ({source}); berth needs them to give the job its owner's files (ext4, xfs, btrfs from \
         Linux 5.12; tmpfs from 6.3)",
        kernel = kernel()
    )]
    NoIdmap {
        path: PathBuf,
        fs: String,
        source: sys::SysError,
    },
}

/// Directories no workspace may be, hold, or lie below.
const SYSTEM: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run",
    "/sbin", "/sys", "/usr",
];

/// What the agent allows, resolved once.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Allowed roots, links resolved.
    pub allowed: Vec<PathBuf>,
    /// The agent's state directory, links resolved.
    pub state_dir: PathBuf,
    /// Host uids berth hands to jobs (never a workspace's owner).
    pub job_uids: std::ops::Range<u64>,
}

/// Lexically normal: absolute, no `.` or `..`, no trailing slash.
pub fn normal(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Why the directory `dir` (links resolved) may not be a workspace, if it
/// may not; `live` lists other live jobs' workspaces.
pub fn refusal(dir: &Path, rules: &Rules, live: &[(PathBuf, String)]) -> Option<Refusal> {
    if rules.allowed.is_empty() {
        return Some(Refusal::NoneAllowed);
    }
    if dir == Path::new("/") {
        return Some(Refusal::Root);
    }
    if let Some(s) = SYSTEM.iter().map(Path::new).find(|s| overlaps(dir, s)) {
        return Some(Refusal::System(s.into()));
    }
    if overlaps(dir, &rules.state_dir) {
        return Some(Refusal::AgentState(rules.state_dir.clone()));
    }
    if !rules.allowed.iter().any(|r| dir.starts_with(r)) {
        let roots: Vec<String> = rules
            .allowed
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        return Some(Refusal::NotAllowed(roots.join(", ")));
    }
    if let Some((at, job)) = live.iter().find(|(w, _)| overlaps(dir, w)) {
        return Some(Refusal::InUse {
            at: at.clone(),
            job: job.clone(),
        });
    }
    None
}

/// Who in the job owns a directory owned by `owner` on the host, when the
/// job asked for `as_uid`; or why that cannot be.
pub fn job_ids(
    owner: (u32, u32),
    as_uid: Option<u32>,
    rules: &Rules,
) -> Result<(u32, u32), Refusal> {
    let (uid, gid) = owner;
    if uid == 0 || gid == 0 {
        return Err(Refusal::RootOwned(uid, gid));
    }
    if rules.job_uids.contains(&u64::from(uid)) {
        return Err(Refusal::JobOwned(uid));
    }
    let range = super::super::config::RANGE_SIZE;
    match as_uid {
        Some(0) => Ok((0, 0)),
        Some(u) if u < range => Ok((u, if gid < range { gid } else { u })),
        Some(u) => Err(Refusal::UidOutOfRange(u)),
        None if uid < range && gid < range => Ok((uid, gid)),
        None => Err(Refusal::OwnerOutOfRange(uid)),
    }
}

/// Checks `reqs` and returns the workspaces to mount: each asked-for
/// directory and, beside it where that is allowed too, its `DIR@tmp`
/// (Jenkins keeps its step scripts and their output there), made for the
/// owner if missing. Without `make`, only the checks (and no `DIR@tmp`).
pub fn check(
    reqs: &[WorkspaceRequest],
    rules: &Rules,
    live: &[(PathBuf, String)],
    make: bool,
) -> Result<Vec<Workspace>, WorkspaceError> {
    let mut out: Vec<Workspace> = Vec::new();
    for r in reqs {
        let refused = |why| WorkspaceError::Refused {
            path: r.path.clone(),
            why,
        };
        let io = |source| WorkspaceError::Io {
            path: r.path.clone(),
            source,
        };
        let at = normal(&r.path).ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an absolute path without . or ..",
            ))
        })?;
        let dir = std::fs::canonicalize(&at).map_err(io)?;
        let md = std::fs::metadata(&dir).map_err(io)?;
        if !md.is_dir() {
            return Err(refused(Refusal::NotADirectory));
        }
        let mut taken: Vec<(PathBuf, String)> = live.to_vec();
        taken.extend(
            out.iter()
                .map(|w| (w.dir.clone(), "(this one)".to_string())),
        );
        if let Some(why) = refusal(&dir, rules, &taken) {
            return Err(refused(why));
        }
        let owner = (md.uid(), md.gid());
        let in_job = job_ids(owner, r.as_uid, rules).map_err(refused)?;
        out.push(Workspace {
            at: at.clone(),
            dir: dir.clone(),
            owner,
            in_job,
            id: (md.dev(), md.ino()),
        });
        // `DIR@tmp` comes along where it is allowed too: not beside a
        // directory that is itself the allowed root.
        let tmp_at = sibling_tmp(&at);
        let tmp_dir = sibling_tmp(&dir);
        match refusal(&tmp_dir, rules, &taken) {
            Some(Refusal::NotAllowed(_)) => continue,
            Some(why) => return Err(WorkspaceError::Refused { path: tmp_at, why }),
            None => {}
        }
        if !make {
            continue;
        }
        make_tmp(&tmp_dir, owner, md.mode()).map_err(|source| WorkspaceError::Io {
            path: tmp_dir.clone(),
            source,
        })?;
        let tmp_md = std::fs::symlink_metadata(&tmp_dir).map_err(io)?;
        out.push(Workspace {
            at: tmp_at,
            dir: tmp_dir,
            owner,
            in_job,
            id: (tmp_md.dev(), tmp_md.ino()),
        });
    }
    Ok(out)
}

fn sibling_tmp(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push("@tmp");
    PathBuf::from(s)
}

/// `DIR@tmp` as its workspace's owner would have made it; one that exists
/// must be a directory of the same owner (not a link). Made relative to
/// its parent opened without following links, and set up through its own
/// descriptor: no link swapped in on the way sends root's changes elsewhere.
fn make_tmp(tmp: &Path, owner: (u32, u32), mode: u32) -> std::io::Result<()> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let (Some(parent), Some(name)) = (tmp.parent(), tmp.file_name()) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    let parent = super::super::sys::open_dir_nofollow(parent, true)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let dirfd = std::os::fd::AsRawFd::as_raw_fd(&parent);
    let made = match nix::sys::stat::mkdirat(Some(dirfd), name, Mode::from_bits_truncate(0o700)) {
        Ok(()) => true,
        Err(nix::errno::Errno::EEXIST) => false,
        Err(e) => return Err(e.into()),
    };
    let fd = nix::fcntl::openat(
        Some(dirfd),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "exists, but is not a directory owned by {}:{} ({e})",
                owner.0, owner.1
            ),
        )
    })?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    let dir: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    if made {
        std::os::unix::fs::fchown(&dir, Some(owner.0), Some(owner.1))?;
        dir.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))?;
    } else if (dir.metadata()?.uid(), dir.metadata()?.gid()) != owner {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "exists, but is not a directory owned by {}:{}",
                owner.0, owner.1
            ),
        ));
    }
    Ok(())
}

/// Checks that idmapped mounts of the directory `dir` can be made here
/// (the clone is made and dropped, never attached).
pub fn probe(dir: &Path) -> Result<(), WorkspaceError> {
    let high = u32::MAX - 2 * super::super::config::RANGE_SIZE;
    let map = format!("0 {high} 1\n");
    let ns = IdmapNs::new(&map, &map)?;
    let fd = sys::open_dir_nofollow(dir, false).map_err(|e| WorkspaceError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    sys::idmapped_clone(std::os::fd::AsFd::as_fd(&fd), dir, ns.fd(), false)
        .map(drop)
        .map_err(|source| WorkspaceError::NoIdmap {
            path: dir.to_path_buf(),
            fs: fs_name(dir),
            source,
        })
}

/// The name of the filesystem `path` is on, for an error message.
pub fn fs_name(path: &Path) -> String {
    let Ok(st) = nix::sys::statfs::statfs(path) else {
        return "unknown".into();
    };
    let magic = st.filesystem_type().0 as u64;
    let name = match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x2FC1_2FC1 => "zfs",
        0x6573_5546 => "fuse",
        0x8584_58F6 => "ramfs",
        _ => return format!("filesystem magic {magic:#x}"),
    };
    name.into()
}

/// The running kernel's release.
pub fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            allowed: vec!["/srv/ci".into(), "/var/lib/jenkins/workspace".into()],
            state_dir: "/var/lib/berth".into(),
            job_uids: 100_000..100_000 + 4 * 65536,
        }
    }

    #[test]
    fn requests_read_a_path_and_who_owns_it_in_the_job() {
        let r: WorkspaceRequest = "/srv/ci/app".parse().unwrap();
        assert_eq!(
            (r.path.as_path(), r.as_uid),
            (Path::new("/srv/ci/app"), None)
        );
        let r: WorkspaceRequest = "/srv/ci/app:root".parse().unwrap();
        assert_eq!(r.as_uid, Some(0));
        let r: WorkspaceRequest = "/srv/ci/app:1001".parse().unwrap();
        assert_eq!(r.as_uid, Some(1001));
        // A colon that names no uid is part of the path.
        let r: WorkspaceRequest = "/srv/ci/a:b".parse().unwrap();
        assert_eq!(r.path, Path::new("/srv/ci/a:b"));
        assert!("srv/ci".parse::<WorkspaceRequest>().is_err());
        let j: WorkspaceRequest = serde_json::from_str(r#"{"path":"/srv/ci/x","as":0}"#).unwrap();
        assert_eq!(j.as_uid, Some(0));
    }

    #[test]
    fn only_directories_below_an_allowed_root_and_clear_of_the_system_are_accepted() {
        let r = rules();
        let live = [(PathBuf::from("/srv/ci/other"), "0123456789ab".to_string())];
        let refused = |d: &str| refusal(Path::new(d), &r, &live);
        assert_eq!(refused("/srv/ci/app"), None);
        assert_eq!(refused("/var/lib/jenkins/workspace/app_main"), None);
        assert_eq!(refused("/"), Some(Refusal::Root));
        assert_eq!(refused("/etc/ssl"), Some(Refusal::System("/etc".into())));
        assert_eq!(refused("/usr"), Some(Refusal::System("/usr".into())));
        assert_eq!(
            refused("/var/lib"),
            Some(Refusal::AgentState("/var/lib/berth".into()))
        );
        assert_eq!(
            refused("/var/lib/berth/jobs/x"),
            Some(Refusal::AgentState("/var/lib/berth".into()))
        );
        assert!(matches!(
            refused("/home/alice"),
            Some(Refusal::NotAllowed(_))
        ));
        assert!(matches!(refused("/srv/cix"), Some(Refusal::NotAllowed(_))));
        for taken in ["/srv/ci/other", "/srv/ci/other/sub", "/srv/ci"] {
            assert_eq!(
                refused(taken),
                Some(Refusal::InUse {
                    at: "/srv/ci/other".into(),
                    job: "0123456789ab".into()
                }),
                "{taken}"
            );
        }
        let none = Rules {
            allowed: vec![],
            ..rules()
        };
        assert_eq!(
            refusal(Path::new("/srv/ci/app"), &none, &[]),
            Some(Refusal::NoneAllowed)
        );
    }

    #[test]
    fn one_job_id_is_the_owner_and_never_root_or_another_job() {
        let r = rules();
        assert_eq!(job_ids((1000, 1000), None, &r), Ok((1000, 1000)));
        assert_eq!(job_ids((1000, 1000), Some(0), &r), Ok((0, 0)));
        assert_eq!(job_ids((1000, 1001), Some(1234), &r), Ok((1234, 1001)));
        assert_eq!(
            job_ids((0, 1000), None, &r),
            Err(Refusal::RootOwned(0, 1000))
        );
        assert_eq!(
            job_ids((1000, 0), None, &r),
            Err(Refusal::RootOwned(1000, 0))
        );
        assert_eq!(
            job_ids((100_005, 100_005), None, &r),
            Err(Refusal::JobOwned(100_005))
        );
        assert_eq!(
            job_ids((70_000, 70_000), None, &r),
            Err(Refusal::OwnerOutOfRange(70_000))
        );
        assert_eq!(job_ids((70_000, 70_000), Some(0), &r), Ok((0, 0)));
        assert_eq!(
            job_ids((1000, 1000), Some(65536), &r),
            Err(Refusal::UidOutOfRange(65536))
        );
    }

    #[test]
    fn the_idmap_maps_the_owner_to_one_job_id() {
        let w = Workspace {
            at: "/srv/ci/app".into(),
            dir: "/srv/ci/app".into(),
            owner: (1000, 1001),
            in_job: (0, 0),
            id: (0, 0),
        };
        assert_eq!(
            w.idmap(200_000),
            ("1000 200000 1\n".to_string(), "1001 200000 1\n".to_string())
        );
    }

    #[test]
    fn dir_at_tmp_is_made_for_the_owner_and_a_link_there_is_refused() {
        let base = std::env::temp_dir().join(format!("berth-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let ws = base.join("app");
        std::fs::create_dir_all(&ws).unwrap();
        std::os::unix::fs::chown(&ws, Some(1234), Some(1235)).unwrap();
        let r = Rules {
            allowed: vec![std::fs::canonicalize(&base).unwrap()],
            state_dir: "/var/lib/berth-none".into(),
            job_uids: 100_000..100_001,
        };
        let req = WorkspaceRequest {
            path: ws.clone(),
            as_uid: None,
        };
        let got = check(std::slice::from_ref(&req), &r, &[], true).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].at, base.join("app@tmp"));
        let md = std::fs::metadata(base.join("app@tmp")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 1235));
        // A workspace that is itself the allowed root has no DIR@tmp.
        let own_root = Rules {
            allowed: vec![std::fs::canonicalize(&ws).unwrap()],
            ..r.clone()
        };
        let alone = check(std::slice::from_ref(&req), &own_root, &[], true).unwrap();
        assert_eq!(alone.len(), 1);
        // A second request for the same directory overlaps the first.
        let e = check(&[req.clone(), req.clone()], &r, &[], true).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        // A link planted as DIR@tmp is not followed.
        std::fs::remove_dir(base.join("app@tmp")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("app@tmp")).unwrap();
        let e = check(std::slice::from_ref(&req), &r, &[], true).unwrap_err();
        assert!(e.to_string().contains("not a directory owned by"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
