//! A job's disk bound: the job's `root` (data-root, exec-root, TMPDIR, home)
//! is an ext4 filesystem of its own, in a sparse image beside it in the job's
//! directory, loop-mounted by the agent before the job starts. The kernel
//! enforces the size (a job that fills it gets ENOSPC alone); teardown
//! unmounts it and deletes the image, which frees its space at once.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image's name in the job's directory (root-owned, 0600: the job never
/// sees it, only the filesystem inside).
pub const IMAGE: &str = "disk.img";

/// The smallest bound a job may have: dockerd's own files take a few MiB.
pub const MIN_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create the job's disk image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {tool} for {path}: {source} (install e2fsprogs and util-linux)")]
    Spawn {
        tool: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} failed for {path}: {stderr}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("cannot unmount the job's disk at {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    #[error("what it holds does not fit a disk of {bytes} bytes: {why}")]
    TooSmall { bytes: u64, why: String },
    #[error("cannot remove the job's disk image {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Makes a `bytes`-sized filesystem whose root belongs to host id `owner`
/// and mounts it on `root` (an existing, empty directory).
pub fn create(job_dir: &Path, root: &Path, bytes: u64, owner: u32) -> Result<(), DiskError> {
    let image = job_dir.join(IMAGE);
    make_image(&image, bytes, owner)?;
    // No nodev, nosuid, noexec or atime option: the job's mount namespace
    // copies this mount with its flags locked, and a bind-then-remount
    // read-only inside the job (containerd's, under every BuildKit step on
    // dockerd 20.10) that does not repeat a locked flag is refused. What
    // nodev would guard against cannot happen here: the job's root maps to
    // an unprivileged host uid, and the kernel lets only a holder of
    // CAP_MKNOD in the initial user namespace make a device node, so none
    // can exist on this filesystem (docs/sandbox.md, "The job's disk").
    mount_image(&image, root, "loop")?;
    let err = |source| DiskError::Image {
        path: image.clone(),
        source,
    };
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    // Root-owned, so invisible to the job; nothing of the job goes there.
    let lost = root.join("lost+found");
    if lost.exists() {
        std::fs::remove_dir(&lost).map_err(err)?;
    }
    Ok(())
}

/// Where an idmapped disk is mounted as it is on disk, for the agent to
/// lay out before the job's view of it is attached (see [`attach_idmapped`]).
pub const STAGING: &str = "disk";

/// Mounts the job's filesystem, from `image` (made with `bytes` and root
/// owner 0 when it is not there yet), as it is on disk at the job's
/// staging directory: its files carry the ids of the job's namespace
/// (0..65535), whatever host range the job runs in, so that another job
/// can start from a copy of it. Returns the staging directory, for the
/// agent to lay the job's files out in before [`attach_idmapped`].
pub fn create_staged(job_dir: &Path, image: &Path, bytes: u64) -> Result<PathBuf, DiskError> {
    if !image.exists() {
        make_image(image, bytes, 0)?;
    }
    let staging = job_dir.join(STAGING);
    let err = |source| DiskError::Image {
        path: staging.clone(),
        source,
    };
    std::fs::create_dir_all(&staging).map_err(err)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    mount_image(image, &staging, "loop")?;
    let lost = staging.join("lost+found");
    if lost.exists() {
        std::fs::remove_dir(&lost).map_err(err)?;
    }
    Ok(staging)
}

/// Attaches the staged filesystem on `root` seen through `userns` (which
/// maps 0..65535 onto the job's range), then unmounts the staging mount:
/// the job's view is the only one left.
pub fn attach_idmapped(
    job_dir: &Path,
    root: &Path,
    userns: std::os::fd::BorrowedFd<'_>,
) -> Result<(), DiskError> {
    use super::super::sys;
    let staging = job_dir.join(STAGING);
    let sys_err = |e: sys::SysError| DiskError::Tool {
        tool: "idmapped mount",
        path: staging.clone(),
        stderr: e.to_string(),
    };
    let dir = sys::open_dir_nofollow(&staging, true).map_err(sys_err)?;
    let tree = sys::idmapped_clone_with(
        std::os::fd::AsFd::as_fd(&dir),
        &staging,
        userns,
        false,
        false,
    )
    .map_err(sys_err)?;
    sys::attach_tree(std::os::fd::AsFd::as_fd(&tree), root).map_err(sys_err)?;
    unmount(&staging)
}

/// A new sparse image (0600) of `bytes` holding an ext4 filesystem whose
/// root belongs to host id `owner`.
pub fn make_image(image: &Path, bytes: u64, owner: u32) -> Result<(), DiskError> {
    let err = |source| DiskError::Image {
        path: image.into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(err)?;
    // Sparse: the host gives the job space as it writes, up to `bytes`.
    file.set_len(bytes).map_err(err)?;
    drop(file);
    // No journal: the filesystem lives as long as the job, whose state is
    // thrown away at its end; a crash loses nothing anyone keeps. Inode
    // tables are initialised lazily, so this takes milliseconds.
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
            .arg(format!(
                "lazy_itable_init=1,nodiscard,root_owner={owner}:{owner}"
            ))
            .arg(image),
        "mkfs.ext4",
        image,
    )
}

/// Makes a copy of a key's image the size of this job's disk bound, which
/// differs from the bound of the job that committed it only when a job
/// asks for another one: checked (`e2fsck`), then grown or shrunk
/// (`resize2fs`). A state that does not fit the smaller bound is refused
/// with resize2fs's reason. Costs nothing when the bounds agree.
pub fn fit(image: &Path, bytes: u64) -> Result<(), DiskError> {
    let err = |source| DiskError::Image {
        path: image.into(),
        source,
    };
    let len = std::fs::metadata(image).map_err(err)?.len();
    // Whole 4 KiB blocks, as mkfs.ext4 makes them of `bytes`.
    let size = bytes / 4096 * 4096;
    if len / 4096 * 4096 == size {
        return Ok(());
    }
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| DiskError::Spawn {
            tool: "e2fsck",
            path: image.into(),
            source,
        })?;
    // 1: errors corrected (none are expected of a cleanly unmounted image).
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(DiskError::Tool {
            tool: "e2fsck",
            path: image.into(),
            stderr: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        });
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(err)?;
    if size > len {
        file.set_len(size).map_err(err)?;
    }
    let resized = run(
        Command::new("resize2fs")
            .arg(image)
            .arg(format!("{}K", size / 1024)),
        "resize2fs",
        image,
    );
    match resized {
        Err(DiskError::Tool { stderr, .. }) if size < len => {
            return Err(DiskError::TooSmall { bytes, why: stderr });
        }
        r => r?,
    }
    if size < len {
        file.set_len(size).map_err(err)?;
    }
    Ok(())
}

/// Mounts `image` on `root` with `options` (which include `loop`: the loop
/// device is set up with autoclear and goes with the last unmount).
pub fn mount_image(image: &Path, root: &Path, options: &str) -> Result<(), DiskError> {
    run(
        Command::new("mount")
            .args(["-t", "ext4", "-o", options])
            .arg(image)
            .arg(root),
        "mount",
        image,
    )
}

/// Unmounts the job's filesystem from `root` (detached: it goes when its
/// last user does, and the job's processes are gone by now) and deletes the
/// image. Idempotent.
pub fn remove(job_dir: &Path, root: &Path) -> Result<(), DiskError> {
    unmount(root)?;
    unmount(&job_dir.join(STAGING))?;
    let image = job_dir.join(IMAGE);
    match std::fs::remove_file(&image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Remove {
            path: image,
            source,
        }),
    }
}

/// Unmounts whatever is mounted on `root`, detached, mounts stacked on
/// one another (a crash between two attempts) too. Idempotent.
pub fn unmount(root: &Path) -> Result<(), DiskError> {
    for _ in 0..8 {
        match super::super::sys::unmount_detached(root) {
            Ok(()) => continue,
            // Not (or no longer) a mount point, or not there at all.
            Err(nix::Error::EINVAL | nix::Error::ENOENT) => break,
            Err(source) => {
                return Err(DiskError::Unmount {
                    path: root.into(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Bytes the job's image takes on the host now (its allocated blocks).
pub fn used_on_host(job_dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(job_dir.join(IMAGE))
        .ok()
        .map(|m| m.blocks() * 512)
}

fn run(cmd: &mut Command, tool: &'static str, path: &Path) -> Result<(), DiskError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| DiskError::Spawn {
            tool,
            path: path.into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(DiskError::Tool {
        tool,
        path: path.into(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}
