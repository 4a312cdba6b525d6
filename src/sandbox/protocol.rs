//! The agent ↔ stage-1 helper protocol. One `SOCK_SEQPACKET` socketpair,
//! handed to the helper as fd 3: every message is one packet of JSON, so
//! boundaries hold and descriptors ride with the message they belong to.
//!
//! ```text
//! agent  → Start { layers }   helper is in the job's cgroups; the shared
//!                             layer trees come along as fds: unshare now
//! helper → Unshared           write the uid/gid maps, move the link in; the
//!                             job's network and mount namespaces, and the
//!                             helper's own mount namespace (where workspaces
//!                             for a warm job are attached), come along as fds
//! agent  → Mapped
//! helper → Init { pid }       the job's pid 1, as the host sees it
//! init   → Ready              dockerd is started   (or Failed { message })
//! ```
//!
//! Both ends are blocking: the helper is single-threaded, and the agent
//! runs its side off the async runtime.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};

/// Largest message (the messages are a few dozen bytes).
const MAX_MESSAGE: usize = 16 * 1024;
/// Most descriptors one message carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToHelper {
    /// Attach the `layers` trees sent alongside, then unshare.
    Start { layers: usize },
    /// uid/gid maps are written and the link is in: become root, fork init.
    Mapped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum FromHelper {
    Unshared,
    Init { pid: u32 },
    Ready,
    Failed { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the other side went away (expected {expected})")]
    Closed { expected: &'static str },
    #[error("no message within {waited:?} (expected {expected})")]
    Timeout {
        expected: &'static str,
        waited: Duration,
    },
    #[error("expected {expected}, received {received}")]
    Unexpected {
        expected: &'static str,
        received: String,
    },
    /// The helper or the job's init reported this failure.
    #[error("{message}")]
    Failed { message: String },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        source: nix::errno::Errno,
    },
}

fn sys(op: &'static str) -> impl FnOnce(nix::errno::Errno) -> ProtocolError {
    move |source| ProtocolError::Sys { op, source }
}

/// A new pair: the agent's end and the helper's end (both close-on-exec;
/// the helper's is placed on fd 3 of the helper alone).
pub fn pair() -> Result<(AgentEnd, OwnedFd), ProtocolError> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys("socketpair"))?;
    Ok((AgentEnd(Channel(a)), b))
}

struct Channel(OwnedFd);

impl Channel {
    fn send<T: Serialize>(&self, msg: &T, fds: &[OwnedFd]) -> Result<(), ProtocolError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [std::io::IoSlice::new(&bytes)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(self.0.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .map(drop)
            .map_err(sys("sendmsg"))
    }

    fn recv<T: for<'de> Deserialize<'de>>(
        &self,
        expected: &'static str,
        timeout: Option<Duration>,
    ) -> Result<(T, Vec<OwnedFd>), ProtocolError> {
        if let Some(t) = timeout {
            let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
            nix::sys::socket::setsockopt(&self.0, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
                .map_err(sys("setsockopt(SO_RCVTIMEO)"))?;
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([i32; MAX_FDS]);
        let msg = loop {
            match recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(ProtocolError::Timeout {
                        expected,
                        waited: timeout.unwrap_or_default(),
                    });
                }
                Err(e) => {
                    return Err(ProtocolError::Sys {
                        op: "recvmsg",
                        source: e,
                    });
                }
            }
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(sys("recvmsg control data"))? {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds.extend(super::sys::adopt_received_fds(v));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(ProtocolError::Closed { expected });
        }
        let value = serde_json::from_slice(&buf[..n]).map_err(|e| {
            ProtocolError::Malformed(format!("{e}: {:?}", String::from_utf8_lossy(&buf[..n])))
        })?;
        Ok((value, fds))
    }
}

/// The agent's end.
pub struct AgentEnd(Channel);

impl AgentEnd {
    pub fn start(&self, layers: &[OwnedFd]) -> Result<(), ProtocolError> {
        self.0.send(
            &ToHelper::Start {
                layers: layers.len(),
            },
            layers,
        )
    }

    pub fn mapped(&self) -> Result<(), ProtocolError> {
        self.0.send(&ToHelper::Mapped, &[])
    }

    /// The next message of the helper or the job's init.
    pub fn recv(
        &self,
        expected: &'static str,
        timeout: Duration,
    ) -> Result<FromHelper, ProtocolError> {
        let (m, _) = self.0.recv::<FromHelper>(expected, Some(timeout))?;
        match m {
            FromHelper::Failed { message } => Err(ProtocolError::Failed { message }),
            m => Ok(m),
        }
    }

    /// Waits for `Unshared`, returning the namespaces that came with it
    /// (the agent enters them later without needing to inspect another
    /// user namespace's process).
    pub fn unshared(&self, timeout: Duration) -> Result<Namespaces, ProtocolError> {
        let (m, fds) = self.0.recv::<FromHelper>("unshared", Some(timeout))?;
        match m {
            FromHelper::Unshared if fds.len() == 3 => {
                let [net, mnt, outer_mnt] = <[OwnedFd; 3]>::try_from(fds)
                    .unwrap_or_else(|_| unreachable!("three descriptors"));
                Ok(Namespaces {
                    net,
                    mnt,
                    outer_mnt,
                })
            }
            FromHelper::Unshared => Err(ProtocolError::Unexpected {
                expected: "unshared with the job's namespaces",
                received: format!("unshared with {} descriptors", fds.len()),
            }),
            FromHelper::Failed { message } => Err(ProtocolError::Failed { message }),
            other => Err(unexpected("unshared", &other)),
        }
    }
}

/// The namespaces the helper sends with `Unshared`.
#[derive(Debug)]
pub struct Namespaces {
    /// The job's network namespace.
    pub net: OwnedFd,
    /// The job's mount namespace.
    pub mnt: OwnedFd,
    /// The helper's mount namespace from before the job's: the master of
    /// the job's drop point (a mount attached below it reaches the job,
    /// its flags locked there).
    pub outer_mnt: OwnedFd,
}

pub fn unexpected(expected: &'static str, got: &FromHelper) -> ProtocolError {
    ProtocolError::Unexpected {
        expected,
        received: format!("{got:?}"),
    }
}

/// The helper's (and the job's init's) end.
pub struct HelperEnd(Channel);

impl HelperEnd {
    /// Takes the descriptor the agent placed on fd 3; marks it close-on-exec
    /// at once, so that neither dockerd nor anything else the job starts
    /// inherits it.
    pub fn from_fd3() -> Result<HelperEnd, ProtocolError> {
        let fd = super::sys::take_fd3();
        nix::fcntl::fcntl(
            fd.as_fd().as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(sys("fcntl(FD_CLOEXEC)"))?;
        Ok(HelperEnd(Channel(fd)))
    }

    /// Waits for `Start`, returning the layer trees that came with it.
    pub fn start(&self) -> Result<Vec<OwnedFd>, ProtocolError> {
        match self.0.recv::<ToHelper>("start", None)? {
            (ToHelper::Start { layers }, fds) if fds.len() == layers => Ok(fds),
            (ToHelper::Start { layers }, fds) => Err(ProtocolError::Unexpected {
                expected: "start",
                received: format!("start with {} of {layers} layer trees", fds.len()),
            }),
            (other, _) => Err(ProtocolError::Unexpected {
                expected: "start",
                received: format!("{other:?}"),
            }),
        }
    }

    pub fn mapped(&self) -> Result<(), ProtocolError> {
        match self.0.recv::<ToHelper>("mapped", None)? {
            (ToHelper::Mapped, _) => Ok(()),
            (other, _) => Err(ProtocolError::Unexpected {
                expected: "mapped",
                received: format!("{other:?}"),
            }),
        }
    }

    pub fn send(&self, msg: &FromHelper) -> Result<(), ProtocolError> {
        self.0.send(msg, &[])
    }

    /// `Unshared`, with the namespaces.
    pub fn unshared(&self, ns: Namespaces) -> Result<(), ProtocolError> {
        self.0
            .send(&FromHelper::Unshared, &[ns.net, ns.mnt, ns.outer_mnt])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper_end(fd: OwnedFd) -> HelperEnd {
        HelperEnd(Channel(fd))
    }

    #[test]
    fn a_whole_start_in_order_with_descriptors() {
        let (agent, theirs) = pair().unwrap();
        let helper = helper_end(theirs);
        let tree = std::fs::File::open("/").unwrap();
        agent.start(&[OwnedFd::from(tree)]).unwrap();
        let got = helper.start().unwrap();
        assert_eq!(got.len(), 1);
        let ns = |n: &str| OwnedFd::from(std::fs::File::open(format!("/proc/self/{n}")).unwrap());
        helper
            .unshared(Namespaces {
                net: ns("ns/net"),
                mnt: ns("ns/mnt"),
                outer_mnt: ns("ns/uts"),
            })
            .unwrap();
        let got = agent.unshared(Duration::from_secs(5)).unwrap();
        for (fd, want) in [
            (&got.net, "net"),
            (&got.mnt, "mnt"),
            (&got.outer_mnt, "uts"),
        ] {
            assert_eq!(
                std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap(),
                std::fs::read_link(format!("/proc/self/ns/{want}")).unwrap(),
                "each namespace arrives in its place"
            );
        }
        agent.mapped().unwrap();
        helper.mapped().unwrap();
        helper.send(&FromHelper::Init { pid: 42 }).unwrap();
        helper.send(&FromHelper::Ready).unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(agent.recv("init", t).unwrap(), FromHelper::Init { pid: 42 });
        assert_eq!(agent.recv("ready", t).unwrap(), FromHelper::Ready);
    }

    #[test]
    fn out_of_order_failed_closed_and_silent_are_typed_errors() {
        let (agent, theirs) = pair().unwrap();
        let helper = helper_end(theirs);
        helper.send(&FromHelper::Ready).unwrap();
        let e = agent.unshared(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Unexpected {
                    expected: "unshared",
                    ..
                }
            ),
            "{e}"
        );
        helper
            .send(&FromHelper::Failed {
                message: "enable controllers: busy".into(),
            })
            .unwrap();
        let e = agent.recv("ready", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("enable controllers: busy"), "{e}");
        let e = agent.recv("ready", Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
        drop(helper);
        let e = agent.recv("ready", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ProtocolError::Closed { .. }), "{e}");
        // Unshared without its namespace is refused.
        let (agent, theirs) = pair().unwrap();
        helper_end(theirs).send(&FromHelper::Unshared).unwrap();
        let e = agent.unshared(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("0 descriptors"), "{e}");
        // The helper counts the trees it was promised.
        let (agent, theirs) = pair().unwrap();
        agent.0.send(&ToHelper::Start { layers: 2 }, &[]).unwrap();
        let e = helper_end(theirs).start().unwrap_err();
        assert!(e.to_string().contains("0 of 2"), "{e}");
    }
}
