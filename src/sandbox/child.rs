//! Code that runs inside a job: the stage-1 helper (unshares the namespaces
//! and waits for the agent to map ids and hand over the link) and pid 1 of
//! the job's pid namespace (mounts the job's view, starts dockerd, reaps
//! zombies, forwards signals). Runs single-threaded, outside any tokio
//! runtime: `unshare(CLONE_NEWUSER)` refuses multi-threaded callers. It talks
//! to the agent through `protocol`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::MsFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::binfmt::{self, Handler};
use super::cgroup::Layout;
use super::fs::root::{self, Step, inside};
use super::net::ports::PortRange;
use super::net::rtnl::{LinkChange, Rtnl, RtnlError};
use super::protocol::{FromHelper, HelperEnd};
use super::sys;

pub const HIDDEN_SUBCOMMAND: &str = "__sandbox-stage1";

/// Everything the job's side needs, passed as JSON on the command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    pub job_id: String,
    pub dockerd: PathBuf,
    /// dockerd's PATH: where it finds containerd, runc, docker-proxy and
    /// docker-init (the engine's own directories first).
    pub path: String,
    /// An empty directory the job's init mounts its new root on.
    pub new_root: PathBuf,
    /// How to build that root (see `fs::root`).
    pub root: Vec<Step>,
    pub hostname: String,
    /// Delegated cgroups to mount inside (ordinary dockerd); None runs
    /// dockerd --rootless.
    pub cgroup: Option<Layout>,
    pub cgroupns: bool,
    pub peer_ifname: String,
    pub job_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    /// The host ports forwarded to the job: its dockerd allocates published
    /// ports from them (the job's `ip_local_port_range`).
    #[serde(default)]
    pub ports: Option<PortRange>,
    pub mtu: u32,
    /// dockerd's --shutdown-timeout, in seconds.
    pub shutdown_timeout: u64,
    pub extra_args: Vec<String>,
    /// Mount points for the shared image layers, in the order their trees
    /// arrive with `Start`.
    #[serde(default)]
    pub shared_layers: Vec<PathBuf>,
    /// Mount points for the workspaces, whose trees follow the layers'.
    #[serde(default)]
    pub workspaces: Vec<PathBuf>,
    /// The job's drop point (`<state>/jobs/<id>/drop`).
    pub drop: PathBuf,
    /// A binfmt_misc instance of the job's own with these handlers (see
    /// `binfmt`); None where the kernel has none per user namespace.
    #[serde(default)]
    pub binfmt: Option<Vec<Handler>>,
    /// containerd's configuration, as the job sees it, when the init starts
    /// containerd before dockerd (every ordinary dockerd; see
    /// `Engine::containerd_first`); None lets dockerd start its own.
    #[serde(default)]
    pub containerd_config: Option<PathBuf>,
    /// The host id that owns the job's user namespace: the first of its
    /// range. What the kernel bounds per user (inotify instances and
    /// watches, namespaces, message queues) it counts against a user
    /// namespace's owner too; owned by root, every job would draw on
    /// root's (128 inotify instances by default, shared with the host's
    /// own services), and one job could take them all.
    pub owner: u32,
}

/// Reports `what` to the agent (and the job's log) and exits.
fn fail(sync: &HelperEnd, what: &str) -> ! {
    eprintln!("berth sandbox: {what}");
    let _ = sync.send(&FromHelper::Failed {
        message: what.to_string(),
    });
    std::process::exit(1);
}

fn exit_code(ws: WaitStatus) -> Option<i32> {
    match ws {
        WaitStatus::Exited(_, c) => Some(c),
        WaitStatus::Signaled(_, s, _) => Some(128 + s as i32),
        _ => None,
    }
}

/// While still host root, in a mount namespace of this job's own (so the
/// host never sees any of it): attaches the shared image layers and the
/// workspaces, and makes the job's drop point, a shared tmpfs. The job's
/// namespaces are created next, from this one: the kernel then locks the
/// copies, and nothing in the job can unmount them or change their flags
/// (read-only layers; `nosuid`, `nodev` workspaces). The drop point becomes
/// a slave there: what the agent attaches below it later (workspaces of a
/// warm job) reaches the job with its flags locked the same way.
fn prepare_mounts(spec: &ChildSpec, trees: Vec<std::os::fd::OwnedFd>) -> Result<(), String> {
    sys::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| e.to_string())?;
    sys::make_rprivate().map_err(|e| e.to_string())?;
    sys::mount(
        "tmpfs",
        &spec.drop,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )
    .map_err(|e| e.to_string())?;
    sys::make_shared(&spec.drop).map_err(|e| e.to_string())?;
    let targets = spec.shared_layers.iter().chain(&spec.workspaces);
    for (tree, target) in trees.iter().zip(targets) {
        sys::attach_tree(std::os::fd::AsFd::as_fd(tree), target).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Entry of `berth __sandbox-stage1 <json>`. Never returns.
pub fn stage1_main(spec_json: &str) -> ! {
    // Only the channel (fd 3) and stdio come from the agent; anything else
    // it may have leaked is closed before the helper does anything.
    if let Err(e) = sys::close_fds_from(4) {
        eprintln!("berth sandbox: {e}");
        std::process::exit(1);
    }
    let sync = match HelperEnd::from_fd3() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth sandbox: no channel to the agent on fd 3: {e}");
            std::process::exit(1);
        }
    };
    let spec: ChildSpec = match serde_json::from_str(spec_json) {
        Ok(s) => s,
        Err(e) => fail(&sync, &format!("bad spec: {e}")),
    };
    // Own session: a Ctrl-C on the agent's terminal must not reach the job.
    if let Err(e) = sys::setsid() {
        fail(&sync, &e.to_string());
    }
    let expected = spec.shared_layers.len() + spec.workspaces.len();
    let trees = match sync.start() {
        Ok(t) if t.len() == expected => t,
        Ok(t) => fail(
            &sync,
            &format!(
                "expected {expected} mounts (shared layers and workspaces), got {}",
                t.len()
            ),
        ),
        Err(e) => fail(&sync, &format!("before start: {e}")),
    };
    if let Err(e) = prepare_mounts(&spec, trees) {
        fail(&sync, &e);
    }
    let ns = |name: &str| match std::fs::File::open(format!("/proc/self/ns/{name}")) {
        Ok(f) => std::os::fd::OwnedFd::from(f),
        Err(e) => fail(&sync, &format!("open /proc/self/ns/{name}: {e}")),
    };
    let outer_mnt = ns("mnt");
    if let Err(e) = sys::own_next_user_namespace(spec.owner)
        .and_then(|()| sys::unshare(sys::job_namespaces(spec.cgroupns)))
    {
        fail(&sync, &e.to_string());
    }
    // The agent enters the job's namespaces by these descriptors (the
    // network one once dockerd answers, the mount ones to bring in a warm
    // job's workspaces): opening /proc/<pid>/ns/* of a process in another
    // user namespace would take CAP_SYS_PTRACE, which an agent in a
    // container need not have.
    let namespaces = super::protocol::Namespaces {
        net: ns("net"),
        mnt: ns("mnt"),
        outer_mnt,
    };
    if let Err(e) = sync.unshared(namespaces).and_then(|()| sync.mapped()) {
        fail(&sync, &format!("while the agent mapped ids: {e}"));
    }
    if let Err(e) = sys::become_ns_root() {
        fail(&sync, &e.to_string());
    }
    match sys::fork() {
        Err(e) => fail(&sync, &e.to_string()),
        Ok(None) => init_main(&spec, sync),
        Ok(Some(init)) => {
            let _ = sync.send(&FromHelper::Init { pid: init as u32 });
            drop(sync);
            // The monitor: lives as long as the job's init and reports its end.
            loop {
                match waitpid(Pid::from_raw(init), None) {
                    Ok(ws) => {
                        if let Some(c) = exit_code(ws) {
                            std::process::exit(c);
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => std::process::exit(125),
                }
            }
        }
    }
}

fn init_main(spec: &ChildSpec, sync: HelperEnd) -> ! {
    if let Err(e) = setup(spec) {
        fail(&sync, &e);
    }
    let forwarded = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    let mut all = forwarded.to_vec();
    all.push(Signal::SIGCHLD);
    let set = match sys::catch_and_block(&all) {
        Ok(s) => s,
        Err(e) => fail(&sync, &e.to_string()),
    };
    let containerd = match &spec.containerd_config {
        Some(config) => match start_containerd(spec, config) {
            Ok(pid) => Some(pid),
            Err(e) => fail(&sync, &e),
        },
        None => None,
    };
    let dockerd = match dockerd_command(spec).spawn() {
        Ok(c) => c.id() as i32,
        Err(e) => fail(
            &sync,
            &format!(
                "cannot start {}: {e} (install Debian's docker.io or set dockerd in the configuration)",
                spec.dockerd.display()
            ),
        ),
    };
    let _ = sync.send(&FromHelper::Ready);
    drop(sync);
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig == Signal::SIGCHLD {
            // Reap everything; re-parented orphans land here too.
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(ws) => {
                        if ws.pid() == Some(Pid::from_raw(dockerd)) {
                            let code = exit_code(ws).unwrap_or(1);
                            eprintln!("berth sandbox: dockerd exited ({ws:?})");
                            if let Some(c) = containerd {
                                stop_containerd(c);
                            }
                            std::process::exit(code);
                        }
                        // Without its containerd, dockerd runs no container:
                        // the job ends.
                        if containerd.is_some_and(|c| ws.pid() == Some(Pid::from_raw(c))) {
                            eprintln!("berth sandbox: containerd exited ({ws:?})");
                            let _ = sys::kill(dockerd, Signal::SIGKILL);
                            std::process::exit(super::CONTAINERD_ENDED);
                        }
                    }
                }
            }
        } else {
            let _ = sys::kill(dockerd, sig);
        }
    }
}

/// The environment dockerd and the containerd the init starts run with.
fn engine_command(program: &Path, spec: &ChildSpec) -> Command {
    let r = Path::new(inside::STATE);
    let mut c = Command::new(program);
    c.env_clear()
        .env("PATH", &spec.path)
        .env("HOME", r.join("home"))
        .env("XDG_RUNTIME_DIR", r.join("xdg"))
        .env("TMPDIR", r.join("tmp"))
        .stdin(std::process::Stdio::null());
    c
}

/// Starts containerd (the one on dockerd's PATH) with `config` and waits
/// until its socket takes connections. Its pid.
fn start_containerd(spec: &ChildSpec, config: &Path) -> Result<i32, String> {
    let mut cmd = engine_command(Path::new("containerd"), spec);
    cmd.arg("--config").arg(config);
    let pid = cmd
        .spawn()
        .map_err(|e| format!("cannot start containerd: {e}"))?
        .id() as i32;
    let socket = Path::new(inside::CONTAINERD_SOCKET);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(pid);
        }
        // SIGCHLD is blocked: an exit shows here, not as a signal.
        if let Ok(ws @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) =
            waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG))
        {
            return Err(format!("containerd exited before it listened ({ws:?})"));
        }
        if std::time::Instant::now() > deadline {
            let _ = sys::kill(pid, Signal::SIGKILL);
            return Err(format!(
                "containerd did not listen on {} within 60 s",
                socket.display()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

/// Stops the containerd the init started once dockerd has ended, as
/// dockerd stops its own: SIGTERM, then up to 10 s for it to close its
/// stores (a project cache commits them), then the job's end kills it.
fn stop_containerd(pid: i32) {
    let _ = sys::kill(pid, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(5)),
            _ => return,
        }
    }
}

fn dockerd_command(spec: &ChildSpec) -> Command {
    let r = Path::new(inside::STATE);
    let mut c = engine_command(&spec.dockerd, spec);
    c.arg("--data-root")
        .arg(inside::DATA_ROOT)
        .arg("--exec-root")
        .arg(r.join("exec"))
        .arg("--pidfile")
        .arg(r.join("dockerd.pid"))
        .arg("--config-file")
        .arg(r.join("daemon.json"))
        .arg("--host")
        .arg(format!("unix://{}", inside::API_SOCKET))
        .arg("--mtu")
        .arg(spec.mtu.to_string())
        .arg("--shutdown-timeout")
        .arg(spec.shutdown_timeout.to_string());
    if spec.cgroup.is_some() {
        c.args(["--exec-opt", "native.cgroupdriver=cgroupfs"]);
    } else {
        c.arg("--rootless");
    }
    if spec.containerd_config.is_some() {
        c.arg("--containerd").arg(inside::CONTAINERD_SOCKET);
    }
    c.args(&spec.extra_args);
    c
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    sys::mount(src, Path::new(target), Some(fstype), flags, data).map_err(|e| e.to_string())
}

fn setup(spec: &ChildSpec) -> Result<(), String> {
    // Everything is private already (the helper made it so before the
    // job's namespaces existed) but the drop point, which must go on
    // receiving what the agent attaches.
    sys::make_rslave().map_err(|e| e.to_string())?;
    root::build(&spec.new_root, &spec.root).map_err(|e| e.to_string())?;
    if let Some(handlers) = &spec.binfmt {
        for refused in binfmt::install(&spec.new_root, handlers)? {
            eprintln!("berth sandbox: binfmt_misc handler not carried into the job: {refused}");
        }
    }
    root::enter(&spec.new_root).map_err(|e| e.to_string())?;
    mount_cgroups(spec)?;
    sys::sethostname(&spec.hostname).map_err(|e| e.to_string())?;
    setup_link(spec)
}

/// The job's delegated cgroups at /sys/fs/cgroup, as its cgroup namespace
/// shows them (rooted at the job's own).
fn mount_cgroups(spec: &ChildSpec) -> Result<(), String> {
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match &spec.cgroup {
        Some(Layout::V1 { hierarchies }) => {
            mnt("tmpfs", "/sys/fs/cgroup", "tmpfs", hard, Some("mode=755"))?;
            for h in hierarchies {
                let name = h
                    .mount
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or("bad cgroup mount name")?;
                let dir = format!("/sys/fs/cgroup/{name}");
                std::fs::create_dir(&dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
                mnt("cgroup", &dir, "cgroup", hard, Some(&h.mount_options()))?;
                // `cpu` and `cpuacct` as links to a joint `cpu,cpuacct`.
                for c in &h.controllers {
                    if c != name && !c.starts_with("name=") {
                        let _ = std::os::unix::fs::symlink(name, format!("/sys/fs/cgroup/{c}"));
                    }
                }
            }
        }
        Some(Layout::V2 { .. }) => {
            mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", hard, None)?;
            // The agent moved this process into the leaf `/init` before the
            // fork, so the namespace root holds no process and may hand its
            // controllers down to dockerd's containers (cgroup v2 lets only
            // leaves hold processes once controllers are enabled).
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let want_own = format!("0::/{}", super::cgroup::INIT_LEAF);
            if own.trim() != want_own {
                return Err(format!(
                    "the job's init is in cgroup {:?}, not {want_own:?}",
                    own.trim()
                ));
            }
            let ctl =
                std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
            let want: Vec<String> = ctl.split_whitespace().map(|c| format!("+{c}")).collect();
            if !want.is_empty() {
                std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", want.join(" "))
                    .map_err(|e| format!("enable controllers for the job's containers: {e}"))?;
            }
        }
        None => {}
    }
    Ok(())
}

fn setup_link(spec: &ChildSpec) -> Result<(), String> {
    configure_link(spec).map_err(|(step, e)| format!("configuring the job's link: {step}: {e}"))?;
    if let Some(p) = spec.ports {
        // dockerd takes the host ports it publishes (`-p 80`, `-P`) from
        // this range, which berth forwards to the job.
        let f = super::host::EPHEMERAL_PORTS;
        std::fs::write(f, format!("{} {}", p.first, p.last))
            .map_err(|e| format!("set the job's port range in {f}: {e}"))?;
    }
    clamp_mss()
}

/// In the job's network namespace (this process's, so its netlink socket's):
/// loopback up, the peer the agent made there becomes `eth0` with the job's
/// address and MTU, and the default route leaves through the host end. A
/// failure names its step.
fn configure_link(spec: &ChildSpec) -> Result<(), (String, RtnlError)> {
    let step = |s: &str| {
        let s = s.to_string();
        move |e| (s, e)
    };
    let mut nl = Rtnl::open().map_err(step("open a netlink socket"))?;
    let lo = nl.link_index("lo").map_err(step("look up lo"))?;
    let up = LinkChange {
        up: true,
        ..Default::default()
    };
    nl.set_link(lo, up).map_err(step("bring up lo"))?;
    let peer = &spec.peer_ifname;
    let eth0 = nl
        .link_index(peer)
        .map_err(step(&format!("look up {peer}")))?;
    nl.set_link(
        eth0,
        LinkChange {
            name: Some("eth0"),
            ..Default::default()
        },
    )
    .map_err(step(&format!("rename {peer} to eth0")))?;
    nl.add_address(eth0, spec.job_ip, 30, false)
        .map_err(step(&format!("address eth0 as {}/30", spec.job_ip)))?;
    nl.set_link(
        eth0,
        LinkChange {
            mtu: Some(spec.mtu),
            ..up
        },
    )
    .map_err(step(&format!("bring up eth0 with MTU {}", spec.mtu)))?;
    nl.add_default_route(spec.host_ip)
        .map_err(step(&format!("add the default route via {}", spec.host_ip)))
}

/// Networks the job's dockerd makes have an MTU of their own (user-defined
/// ones 1500 with dockerd 20.10, whatever `--mtu` says): connections leaving
/// through the job's link announce a segment size that fits the link, so
/// they never depend on path-MTU discovery (ICMP the path may drop).
fn clamp_mss() -> Result<(), String> {
    let out = Command::new("iptables")
        .env("PATH", super::engines::SYSTEM_PATH)
        .args([
            "-w",
            "-t",
            "mangle",
            "-A",
            "FORWARD",
            "-o",
            "eth0",
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN,RST",
            "SYN",
            "-j",
            "TCPMSS",
            "--clamp-mss-to-pmtu",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run iptables (install iptables): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "clamping the job's TCP segment size failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::sandbox::net;

    fn spec(id: &str, mtu: u32) -> ChildSpec {
        ChildSpec {
            job_id: id.into(),
            dockerd: "/usr/sbin/dockerd".into(),
            path: super::super::engines::SYSTEM_PATH.into(),
            new_root: "/nonexistent".into(),
            root: Vec::new(),
            hostname: "job".into(),
            cgroup: None,
            cgroupns: false,
            peer_ifname: net::peer_ifname(id),
            job_ip: Ipv4Addr::new(10, 9, 9, 2),
            host_ip: Ipv4Addr::new(10, 9, 9, 1),
            ports: None,
            mtu,
            shutdown_timeout: 1,
            extra_args: Vec::new(),
            shared_layers: Vec::new(),
            workspaces: Vec::new(),
            drop: "/nonexistent/drop".into(),
            containerd_config: None,
            binfmt: None,
            owner: 1_000_000,
        }
    }

    /// The agent's side and the job's, each in a network namespace of its
    /// own (one thread each): the peer made there becomes eth0, addressed,
    /// up with the link's MTU, and the default route goes through the host
    /// end.
    #[test]
    fn the_jobs_end_becomes_eth0_with_its_address_mtu_and_default_route() {
        net::tests::in_private_netns(|| {
            let id = "fedcba9876543210";
            let spec = spec(id, 1300);
            let (host_ip, mtu) = (spec.host_ip, spec.mtu);
            let (tid_tx, tid_rx) = mpsc::channel();
            let (moved_tx, moved_rx) = mpsc::channel();
            let job = std::thread::spawn(move || {
                sys::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                tid_tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
                moved_rx.recv().unwrap();
                configure_link(&spec)
                    .map_err(|(step, e)| format!("{step}: {e}"))
                    .unwrap();
                let mut nl = Rtnl::open().unwrap();
                let eth0 = nl.link_index("eth0").unwrap();
                let lo = nl.link_index("lo").unwrap();
                let up = |nl: &mut Rtnl, i| {
                    nl.link(i)
                        .unwrap()
                        .header
                        .flags
                        .contains(netlink_packet_route::link::LinkFlags::Up)
                };
                (
                    nl.link_mtu(eth0).unwrap(),
                    nl.addresses(eth0).unwrap(),
                    up(&mut nl, eth0) && up(&mut nl, lo),
                    // The default route's link, as the agent reads its own.
                    net::default_route_mtu(),
                    nl.link_index(&net::peer_ifname(id)).unwrap_err().errno(),
                )
            });
            // The job's namespace is its thread's: the job's end is made
            // there by the thread's id.
            let tid = tid_rx.recv().unwrap();
            net::create_link(id, host_ip, mtu, false, Some(tid)).unwrap();
            assert_eq!(
                Rtnl::open()
                    .unwrap()
                    .link_index(&net::peer_ifname(id))
                    .unwrap_err()
                    .errno(),
                Some(nix::errno::Errno::ENODEV),
                "the job's end is not in the agent's namespace"
            );
            moved_tx.send(()).unwrap();
            let (mtu, addrs, up, route_mtu, old_name) = job.join().unwrap();
            assert_eq!(mtu, 1300);
            assert_eq!(addrs, [(Ipv4Addr::new(10, 9, 9, 2), 30)]);
            assert!(up, "eth0 and lo are up");
            assert_eq!(route_mtu, 1300, "the default route leaves through eth0");
            assert_eq!(old_name, Some(nix::errno::Errno::ENODEV), "renamed");
            // The job's end is gone from the agent's namespace: the delete
            // takes the host end (and the pair with it) and finds no peer.
            net::delete_link(id).unwrap();
        });
    }
}
