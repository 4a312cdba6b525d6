//! The one place where berth makes privileged system calls (namespaces, mounts,
//! identity switches, signals). Every call turns its errno into a typed error
//! that names the operation and the path, so callers never see a bare errno.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{op} failed: {source}{hint}")]
    Call {
        op: String,
        source: Errno,
        hint: &'static str,
    },
    #[error("mount {fstype} on {target} failed: {source}")]
    Mount {
        fstype: String,
        target: PathBuf,
        source: Errno,
    },
}

fn call(op: impl Into<String>, source: Errno) -> SysError {
    SysError::Call {
        op: op.into(),
        source,
        hint: "",
    }
}

/// Namespaces every job gets. The cgroup namespace is added where the kernel
/// has it (`/proc/self/ns/cgroup` exists).
pub fn job_namespaces(with_cgroup: bool) -> CloneFlags {
    let mut f = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if with_cgroup {
        f |= CloneFlags::CLONE_NEWCGROUP;
    }
    f
}

pub fn unshare(flags: CloneFlags) -> Result<(), SysError> {
    nix::sched::unshare(flags).map_err(|e| SysError::Call {
        op: format!("unshare({flags:?})"),
        source: e,
        hint: if e == Errno::EPERM || e == Errno::ENOSPC || e == Errno::EINVAL {
            " (user namespaces disabled? check /proc/sys/user/max_user_namespaces \
             and kernel.unprivileged_userns_clone)"
        } else {
            ""
        },
    })
}

/// Makes `host_id` the owner of the user namespace this process creates
/// next: the kernel takes the owner from the effective ids at creation,
/// and counts its per-user bounds there. Real and saved ids stay root's;
/// the unshare that follows gives the process every capability in the new
/// namespace, whoever owns it.
pub fn own_next_user_namespace(host_id: u32) -> Result<(), SysError> {
    nix::unistd::setegid(Gid::from_raw(host_id)).map_err(|e| call("setegid", e))?;
    nix::unistd::seteuid(Uid::from_raw(host_id)).map_err(|e| call("seteuid", e))?;
    Ok(())
}

/// Become uid/gid 0 of the (already mapped) user namespace with no
/// supplementary groups.
pub fn become_ns_root() -> Result<(), SysError> {
    let zero_g = Gid::from_raw(0);
    let zero_u = Uid::from_raw(0);
    nix::unistd::setresgid(zero_g, zero_g, zero_g).map_err(|e| call("setresgid(0)", e))?;
    nix::unistd::setgroups(&[]).map_err(|e| call("setgroups([])", e))?;
    nix::unistd::setresuid(zero_u, zero_u, zero_u).map_err(|e| call("setresuid(0)", e))?;
    Ok(())
}

pub fn setsid() -> Result<(), SysError> {
    nix::unistd::setsid()
        .map(|_| ())
        .map_err(|e| call("setsid", e))
}

pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SysError> {
    nix::mount::mount(Some(source), target, fstype, flags, data).map_err(|e| SysError::Mount {
        fstype: fstype
            .unwrap_or(if flags.contains(MsFlags::MS_BIND) {
                "bind"
            } else {
                "(propagation)"
            })
            .to_string(),
        target: target.to_path_buf(),
        source: e,
    })
}

/// Make every mount below / private so nothing the job mounts propagates
/// to the host (and nothing of the host's later mounts reaches the job).
pub fn make_rprivate() -> Result<(), SysError> {
    set_propagation(
        Path::new("/"),
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        "rprivate",
    )
}

/// Makes every mount below / a slave: nothing the job mounts propagates
/// anywhere, and only what already receives (the job's drop point) goes on
/// receiving.
pub fn make_rslave() -> Result<(), SysError> {
    set_propagation(
        Path::new("/"),
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        "rslave",
    )
}

/// Makes the mount at `path` shared (a peer group of its own).
pub fn make_shared(path: &Path) -> Result<(), SysError> {
    set_propagation(path, MsFlags::MS_SHARED, "shared")
}

fn set_propagation(target: &Path, flags: MsFlags, what: &str) -> Result<(), SysError> {
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| {
        SysError::Mount {
            fstype: what.into(),
            target: target.to_path_buf(),
            source: e,
        }
    })
}

/// Runs `f` on a thread of its own that has joined the mount namespace
/// `mntns` (its root and working directory are that namespace's root):
/// paths `f` uses are resolved there. The caller's threads stay where
/// they are. Needs CAP_SYS_ADMIN and CAP_SYS_CHROOT.
pub fn in_mntns<T: Send>(
    mntns: std::os::fd::BorrowedFd<'_>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, SysError> {
    on_thread_in(mntns, CloneFlags::CLONE_NEWNS, "mount", f)
}

/// Runs `f` on a new thread that has joined the namespace `ns` of kind
/// `kind` (`what` names it in errors).
fn on_thread_in<T: Send>(
    ns: std::os::fd::BorrowedFd<'_>,
    kind: CloneFlags,
    what: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T, SysError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if kind == CloneFlags::CLONE_NEWNS {
                // A thread shares its root and cwd with the process; it must
                // have its own before it may change mount namespace.
                nix::sched::unshare(CloneFlags::CLONE_FS)
                    .map_err(|e| call("unshare(CLONE_FS)", e))?;
            }
            nix::sched::setns(ns, kind)
                .map_err(|e| call(format!("setns into the job's {what} namespace"), e))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Makes the calling thread create files as `uid`:`gid` (its filesystem
/// ids; its other ids, and every other thread's, stay). A filesystem
/// mounted in a job's user namespace takes new files only from ids mapped
/// there.
pub fn set_thread_fs_ids(uid: u32, gid: u32) -> Result<(), SysError> {
    nix::unistd::setfsgid(Gid::from_raw(gid));
    nix::unistd::setfsuid(Uid::from_raw(uid));
    // Both calls return the previous id and never fail outright: asking
    // again with an invalid id (-1) reads the current one.
    let now_g = nix::unistd::setfsgid(Gid::from_raw(u32::MAX));
    let now_u = nix::unistd::setfsuid(Uid::from_raw(u32::MAX));
    if now_u.as_raw() != uid || now_g.as_raw() != gid {
        return Err(call(
            format!("setfsuid({uid})/setfsgid({gid})"),
            Errno::EPERM,
        ));
    }
    Ok(())
}

/// Detaches the mount at `path` from the tree (MNT_DETACH): the filesystem
/// goes when its last user does.
pub fn unmount_detached(path: &Path) -> Result<(), Errno> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
}

/// Makes `new_root` (a mount point) the caller's `/` and detaches the old
/// root with everything mounted below it: nothing of the tree the caller
/// came from stays reachable by path.
pub fn pivot_into(new_root: &Path) -> Result<(), SysError> {
    nix::unistd::chdir(new_root).map_err(|e| call(format!("chdir({})", new_root.display()), e))?;
    // pivot_root(".", ".") stacks the old root on the new one, at "/", from
    // where it is detached: no directory for it is needed in the new root.
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| call(format!("pivot_root({})", new_root.display()), e))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| call("detach the old root", e))?;
    nix::unistd::chdir("/").map_err(|e| call("chdir(/)", e))
}

/// Makes the bind mount at `path` read-only. The flags a mount had when it
/// came into a user namespace are locked there (a remount that drops one
/// fails), so the remount keeps every one it finds.
pub fn remount_readonly(path: &Path) -> Result<(), SysError> {
    use nix::sys::statvfs::FsFlags;
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| call(format!("statvfs({})", path.display()), e))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (have, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(have) {
            flags |= keep;
        }
    }
    nix::mount::mount(None::<&str>, path, None::<&str>, flags, None::<&str>).map_err(|e| {
        SysError::Mount {
            fstype: "read-only remount".into(),
            target: path.to_path_buf(),
            source: e,
        }
    })
}

pub fn sethostname(name: &str) -> Result<(), SysError> {
    nix::unistd::sethostname(name).map_err(|e| call(format!("sethostname({name})"), e))
}

/// Capabilities the agent uses on the host, by name (as `--cap-add` takes
/// them) and number, and what for. A container that drops the others must
/// keep these (the Dockerfile's header).
pub const AGENT_CAPABILITIES: [(&str, u8, &str); 9] = [
    (
        "CHOWN",
        0,
        "handing each job its directories, cgroups and disk",
    ),
    ("DAC_OVERRIDE", 1, "removing what a job's ids wrote"),
    (
        "FOWNER",
        3,
        "handing each job its directories, cgroups and disk",
    ),
    (
        "KILL",
        5,
        "signalling a job's processes, which run as its own host ids in a user namespace that id owns",
    ),
    ("SETGID", 6, "writing each job's gid map"),
    ("SETUID", 7, "writing each job's uid map"),
    (
        "NET_BIND_SERVICE",
        10,
        "each job's DNS relay, on port 53 of its link",
    ),
    ("NET_ADMIN", 12, "each job's link and firewall rules"),
    ("SYS_ADMIN", 21, "mounts and new namespaces"),
];

/// The capabilities of `AGENT_CAPABILITIES` this process does not have in
/// effect (`CapEff` in `<proc_root>/self/status`); empty when it has all,
/// or when the kernel does not say.
pub fn missing_capabilities(proc_root: &Path) -> Vec<(&'static str, &'static str)> {
    let status = std::fs::read_to_string(proc_root.join("self/status")).unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
    else {
        return Vec::new();
    };
    AGENT_CAPABILITIES
        .iter()
        .filter(|(_, bit, _)| eff & (1 << bit) == 0)
        .map(|(name, _, why)| (*name, *why))
        .collect()
}

/// `missing` as a message says it: each name with what it is for.
pub fn describe_capabilities(missing: &[(&str, &str)]) -> String {
    missing
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `docker run` flags that give `missing` back.
pub fn cap_add_flags(missing: &[(&str, &str)]) -> String {
    missing
        .iter()
        .map(|(name, _)| format!("--cap-add {name}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn kill(pid: i32, sig: Signal) -> Result<(), SysError> {
    match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(call(format!("kill({pid}, {sig})"), e)),
    }
}

pub fn fork() -> Result<Option<i32>, SysError> {
    // SAFETY: called only from the single-threaded stage-1 helper process
    // (no tokio runtime, no other threads), so the child may run arbitrary code.
    match unsafe { nix::unistd::fork() }.map_err(|e| call("fork", e))? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw())),
        nix::unistd::ForkResult::Child => Ok(None),
    }
}

/// Places `fd` on fd 3 of the child `cmd` starts (without close-on-exec),
/// between fork and exec: the stage-1 helper's end of its channel.
pub fn place_on_fd3(cmd: &mut tokio::process::Command, fd: i32) {
    // SAFETY: the hook runs between fork and exec and calls only dup2 or
    // fcntl, both async-signal-safe, touching only the child's fd table.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                // dup2(3, 3) is a no-op that would leave close-on-exec set.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child `cmd` starts enter a new user namespace before exec.
pub fn unshare_user_in_child(cmd: &mut std::process::Command) {
    // SAFETY: the hook runs between fork and exec and makes one syscall
    // (unshare), which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            nix::sched::unshare(CloneFlags::CLONE_NEWUSER).map_err(std::io::Error::from)
        });
    }
}

/// Whether a new user namespace may mount binfmt_misc: an instance of its
/// own (Linux 6.7 and later). Tried in a child, which then execs `true`;
/// its namespaces go with it, and the mount never reaches the agent's
/// (a namespace made with a new user namespace receives propagation only).
pub fn userns_mounts_binfmt() -> bool {
    let mut cmd = std::process::Command::new("true");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the hook runs between fork and exec and makes two syscalls
    // (unshare, mount) with paths short enough for nix's stack buffer: no
    // allocation, async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
            nix::mount::mount(
                Some("binfmt_misc"),
                "/proc/sys/fs/binfmt_misc",
                Some("binfmt_misc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    cmd.status().is_ok_and(|s| s.success())
}

/// Has the kernel SIGKILL the child `cmd` starts when the thread that
/// started it ends (the agent killed included).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    // SAFETY: the hook runs between fork and exec and makes one syscall
    // (prctl), which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Install a no-op handler for `signals` and block them, so that pid 1 of a
/// pid namespace receives them (the kernel drops signals to a namespace init
/// that has no handler) and can collect them with `sigwait`.
pub fn catch_and_block(signals: &[Signal]) -> Result<nix::sys::signal::SigSet, SysError> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, sigaction};
    let mut set = SigSet::empty();
    for s in signals {
        let act = SigAction::new(
            SigHandler::Handler(noop_handler),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler is a no-op extern "C" fn that touches no state.
        unsafe { sigaction(*s, &act) }.map_err(|e| call(format!("sigaction({s})"), e))?;
        set.add(*s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| call("sigprocmask", e))?;
    Ok(set)
}

// The new mount API (linux/mount.h, kernel 5.12+ for idmapped mounts); the
// libc crate does not carry these constants for x86_64 Linux.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Runs `f` on a thread of its own that has joined the network namespace
/// `netns`: what `f` opens of /proc/sys/net is that namespace's. The
/// caller's own threads stay where they are.
pub fn in_netns<T: Send>(
    netns: std::os::fd::BorrowedFd<'_>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, SysError> {
    on_thread_in(netns, CloneFlags::CLONE_NEWNET, "network", f)
}

/// A detached, read-only clone of the tree at `path` (with what is mounted
/// below it) whose file owners are seen through `userns`'s id map (an
/// on-disk id `u` appears as the host id that `u` maps to in `userns`).
pub fn idmapped_readonly_clone(
    path: &Path,
    userns: std::os::fd::BorrowedFd<'_>,
) -> Result<std::os::fd::OwnedFd, SysError> {
    let dir = open_dir_nofollow(path, false)?;
    idmapped_clone(std::os::fd::AsFd::as_fd(&dir), path, userns, true)
}

/// Opens the directory `path` for reference only (O_PATH). With
/// `no_symlinks`, no component of `path` may be a symbolic link: a path
/// checked once cannot be swapped for a link before it is used.
pub fn open_dir_nofollow(path: &Path, no_symlinks: bool) -> Result<std::os::fd::OwnedFd, SysError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let mut how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW);
    if no_symlinks {
        how = how.resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    }
    let fd = nix::fcntl::openat2(libc::AT_FDCWD, path, how)
        .map_err(|e| call(format!("open({})", path.display()), e))?;
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// A detached clone of the mount tree at the opened directory `dir`
/// (`path` names it in errors), idmapped through `userns`, `nosuid` and
/// `nodev`. A read-only clone takes what is mounted below `dir` along; a
/// writable one is that one directory's mount alone.
pub fn idmapped_clone(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    userns: std::os::fd::BorrowedFd<'_>,
    readonly: bool,
) -> Result<std::os::fd::OwnedFd, SysError> {
    idmapped_clone_with(dir, path, userns, readonly, true)
}

/// [`idmapped_clone`], `nosuid` and `nodev` only with `nosuid_nodev`: a
/// job's own disk goes without them, as its plain mount does (see
/// `fs::disk::create`).
pub fn idmapped_clone_with(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    userns: std::os::fd::BorrowedFd<'_>,
    readonly: bool,
    nosuid_nodev: bool,
) -> Result<std::os::fd::OwnedFd, SysError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let empty = c"";
    let recursive = if readonly { AT_RECURSIVE } else { 0 };
    // SAFETY: plain syscall on a valid descriptor with an empty C string
    // and AT_EMPTY_PATH; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | libc::AT_EMPTY_PATH as libc::c_uint
                | recursive,
        )
    };
    if fd < 0 {
        return Err(call(
            format!("open_tree({})", path.display()),
            Errno::last(),
        ));
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut set = MOUNT_ATTR_IDMAP;
    if nosuid_nodev {
        set |= MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    }
    if readonly {
        set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, attr sized as declared.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | recursive,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(SysError::Call {
            op: format!("mount_setattr(idmap, {})", path.display()),
            source: Errno::last(),
            hint: " (idmapped mounts need Linux 5.12+ and a filesystem that supports them)",
        });
    }
    Ok(tree)
}

/// Attaches a detached tree (from [`idmapped_clone`]) at `target`
/// in the caller's mount namespace.
pub fn attach_tree(tree: std::os::fd::BorrowedFd<'_>, target: &Path) -> Result<(), SysError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(|_| SysError::Call {
        op: format!("move_mount({})", target.display()),
        source: Errno::EINVAL,
        hint: "",
    })?;
    let empty = c"";
    // SAFETY: valid fd and C strings; the result is checked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(SysError::Mount {
            fstype: "move_mount".into(),
            target: target.into(),
            source: Errno::last(),
        });
    }
    Ok(())
}

/// The value of extended attribute `name` of `path`, or None when it has
/// none (or it cannot be read).
pub fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the length passed; the result
    // is checked before the buffer is read.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(len).ok().map(|l| buf[..l].to_vec())
}

/// Makes `dst` (an empty file) share every block of `src` (FICLONE): the
/// copy takes the same time whatever `src` holds, and either file's later
/// writes are its own. Both on one filesystem that can (XFS, btrfs).
pub fn reflink(src: &std::fs::File, dst: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: both descriptors are open files borrowed for the call;
    // FICLONE takes the source descriptor as its argument and writes no
    // memory of ours.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes ownership of descriptors the kernel installed with a received
/// SCM_RIGHTS message.
pub fn adopt_received_fds(fds: Vec<i32>) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    fds.into_iter()
        // SAFETY: the kernel just installed these descriptors in this
        // process for the message being read; nothing else owns them.
        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Takes fd 3, which the agent places in the stage-1 helper as its end of
/// the sync channel (see `protocol`). Call once, at the helper's entry.
pub fn take_fd3() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: by the protocol fd 3 of the helper is its end of the pair,
    // and nothing else in the process owns it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(3) }
}

/// Closes every descriptor from `first` up, whatever the parent leaked: a
/// privileged helper starts with only what it was meant to have.
pub fn close_fds_from(first: u32) -> Result<(), SysError> {
    // SAFETY: close_range only closes descriptors; none from `first` up is
    // owned by Rust code at the helper's entry (this runs before anything
    // else opens one).
    let r = unsafe { libc::close_range(first, u32::MAX, 0) };
    if r < 0 {
        return Err(call("close_range", Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cap_eff(line: &str) -> Vec<&'static str> {
        let root = std::env::temp_dir().join(format!("berth-caps-{}", std::process::id()));
        std::fs::create_dir_all(root.join("self")).unwrap();
        std::fs::write(root.join("self/status"), format!("Name:\tberth\n{line}\n")).unwrap();
        let missing = missing_capabilities(&root);
        std::fs::remove_dir_all(&root).unwrap();
        missing.into_iter().map(|(name, _)| name).collect()
    }

    #[test]
    fn missing_capabilities_reads_the_effective_set() {
        assert!(with_cap_eff("CapEff:\t000001ffffffffff").is_empty());
        // Bit 5 is CAP_KILL.
        assert_eq!(with_cap_eff("CapEff:\t000001ffffffffdf"), ["KILL"]);
        // The Dockerfile's list without KILL and NET_BIND_SERVICE.
        let listed = (1u64 << 21) | (1 << 12) | (1 << 7) | (1 << 6) | (1 << 3) | (1 << 1) | 1;
        assert_eq!(
            with_cap_eff(&format!("CapEff:\t{listed:016x}")),
            ["KILL", "NET_BIND_SERVICE"]
        );
        // A kernel that does not say: nothing is claimed missing.
        assert!(with_cap_eff("").is_empty());
    }
}
