//! A listening socket handed over by systemd (`berth.socket`), checked
//! before it is used.

/// A listening socket handed over by systemd socket activation
/// (`LISTEN_FDS=1`, `LISTEN_PID` = this process, the socket on fd 3).
pub fn inherited_listener() -> Result<Option<std::net::TcpListener>, String> {
    let Ok(n) = std::env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_us {
        return Ok(None);
    }
    if n.trim() != "1" {
        return Err(format!(
            "LISTEN_FDS={n}: berth takes exactly one socket (berth.socket with one ListenStream)"
        ));
    }
    // The variables stay in our environment; job helpers start with a
    // cleared one, so no child takes them for its own.
    use std::os::fd::FromRawFd;
    let kind = nix::sys::socket::getsockopt(
        // SAFETY: fd 3 is the activation socket by the protocol; borrowed only.
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(3) },
        nix::sys::socket::sockopt::SockType,
    )
    .map_err(|e| format!("LISTEN_FDS: fd 3 is not a socket: {e}"))?;
    if kind != nix::sys::socket::SockType::Stream {
        return Err("LISTEN_FDS: fd 3 is not a stream socket".into());
    }
    // Inherited without close-on-exec: every `ip`, `iptables` or helper the
    // agent starts would hold the listening socket.
    nix::fcntl::fcntl(
        3,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("LISTEN_FDS: cannot mark fd 3 close-on-exec: {e}"))?;
    // SAFETY: fd 3 belongs to this process from here on (protocol above).
    Ok(Some(unsafe { std::net::TcpListener::from_raw_fd(3) }))
}
