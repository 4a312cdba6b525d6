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

/// Make every mount below / private so nothing the job mounts propagates to
/// the host (and nothing of the host's later mounts reaches the job).
pub fn make_rprivate() -> Result<(), SysError> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SysError::Mount {
        fstype: "rprivate".into(),
        target: "/".into(),
        source: e,
    })
}

pub fn sethostname(name: &str) -> Result<(), SysError> {
    nix::unistd::sethostname(name).map_err(|e| call(format!("sethostname({name})"), e))
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

/// Duplicate `fd` onto fd 3 of a child between fork and exec.
///
/// # Safety
/// Must only be called in a `pre_exec` hook: it uses nothing but `dup2`,
/// which is async-signal-safe.
pub unsafe fn dup_to_fd3(fd: i32) -> std::io::Result<()> {
    if fd == 3 {
        // dup2(3, 3) is a no-op that would leave close-on-exec set.
        // SAFETY: fcntl is async-signal-safe and touches only the fd table.
        if unsafe { libc::fcntl(3, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 is async-signal-safe and touches only the fd table.
    if unsafe { libc::dup2(fd, 3) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
