//! The id maps of idmapped mounts: a user namespace held by a short-lived
//! process, whose `uid_map` and `gid_map` say how on-disk owners appear
//! through a mount made with it (an on-disk id `u` appears as the host id
//! `u` maps to).

use std::path::PathBuf;

use super::super::sys;

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct IdmapError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

pub struct IdmapNs {
    child: std::process::Child,
    ns: std::fs::File,
}

impl IdmapNs {
    /// A user namespace with these `uid_map` and `gid_map` lines.
    pub fn new(uid_map: &str, gid_map: &str) -> Result<IdmapNs, IdmapError> {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        sys::unshare_user_in_child(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| IdmapError {
            what: "cannot start",
            path: "sleep".into(),
            source,
        })?;
        let pid = child.id();
        let done = (|| {
            for (f, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
                let path = PathBuf::from(format!("/proc/{pid}/{f}"));
                std::fs::write(&path, map).map_err(|source| IdmapError {
                    what: "cannot write",
                    path,
                    source,
                })?;
            }
            let path = PathBuf::from(format!("/proc/{pid}/ns/user"));
            std::fs::File::open(&path).map_err(|source| IdmapError {
                what: "cannot open",
                path,
                source,
            })
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

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.ns)
    }
}

impl Drop for IdmapNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
