//! Shared fixtures for the privileged integration tests: prerequisite checks
//! that fail loudly, an engine per test on its own state dir, uid pool and
//! address pool, a busybox base image made from Debian's busybox-static, the
//! docker CLI as the client, and a scan for anything a job left behind.
#![allow(dead_code)]

pub mod load;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use berth::sandbox::{Engine, SandboxConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Only this variable skips the privileged tests; CI never sets it.
pub const OPT_OUT: &str = "BERTH_SKIP_PRIVILEGED_TESTS";

/// The berth binary under test: the one cargo built, or `BERTH_TEST_BIN`
/// where the test binaries run elsewhere (the cgroup v2 guest lane).
pub fn berth_bin() -> PathBuf {
    std::env::var_os("BERTH_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_berth").into())
}

/// Writes a stand-in `dockerd` at `path` that gives its version as Debian
/// 12's does, and otherwise explains itself on stderr and exits 3, as a
/// broken install would.
pub fn fake_dockerd(path: &Path, says: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo 'Docker version 20.10.24+dfsg1, build fake'; exit 0; }}\necho '{says}' >&2\nexit 3\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// A file of a container's cgroup inside a job: `v1` is (hierarchy, file),
/// `v2` the file's name in the single tree.
pub fn container_cgroup_file(
    sb: &berth::sandbox::Sandbox,
    container_id: &str,
    v1: (&str, &str),
    v2: &str,
) -> PathBuf {
    use berth::sandbox::Layout;
    let cg = sb.record().cgroup.expect("the job has delegated cgroups");
    let below = Path::new("job/docker").join(container_id.trim());
    match &cg.layout {
        Layout::V1 { hierarchies } => {
            let h = hierarchies
                .iter()
                .find(|h| h.controllers.iter().any(|c| c == v1.0))
                .unwrap_or_else(|| panic!("no {} hierarchy", v1.0));
            h.mount.join(&cg.rel).join(below).join(v1.1)
        }
        Layout::V2 { mount, .. } => mount.join(&cg.rel).join(below).join(v2),
    }
}

/// Panics, naming the fix, when something the privileged tests need is
/// missing. Returns false only under the explicit opt-out.
pub fn prerequisites() -> bool {
    if std::env::var_os(OPT_OUT).is_some() {
        eprintln!("{OPT_OUT} is set: privileged test not run");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged tests need root (set {OPT_OUT}=1 to opt out explicitly)"
    );
    for (bin, pkg) in [
        ("/usr/sbin/dockerd", "docker.io"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/sbin/iptables", "iptables"),
    ] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: apt-get install {pkg}"
        );
    }
    assert!(
        Command::new("docker").arg("--version").output().is_ok(),
        "the docker CLI is missing: apt-get install docker.io"
    );
    // Without buildx the CLI would fall back to the legacy builder, and
    // every build here would test the wrong thing.
    assert!(
        Command::new("docker")
            .args(["buildx", "version"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "the docker CLI has no buildx plugin: run scripts/debian13-parts plugins"
    );
    true
}

/// A per-test engine. `n` (unique per test, < 128) selects a disjoint uid
/// pool, address pool and state dir so tests run in parallel.
pub fn engine_config(n: u32, name: &str) -> SandboxConfig {
    let state_dir = PathBuf::from(format!("/var/lib/bt/{name}"));
    if state_dir.exists() {
        // Left by an interrupted earlier run: recover it before reuse.
        if let Ok(e) = Engine::new(SandboxConfig {
            state_dir: state_dir.clone(),
            helper: berth_bin(),
            ..Default::default()
        }) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let _ = rt.block_on(e.recover());
        }
    }
    SandboxConfig {
        state_dir,
        helper: berth_bin(),
        uid_base: 1_600_000_000 + n * 8 * 65536,
        uid_ranges: 8,
        net_pool: Ipv4Addr::new(10, 214, n as u8, 0),
        net_pool_prefix: 24,
        // Below the host's ephemeral ports: a loopback server a test binds
        // to port 0 never lands in another test's forwarded block.
        port_pool: berth::sandbox::PortRange {
            first: (10000 + n * 128) as u16,
            last: (10000 + n * 128 + 127) as u16,
        },
        ports_per_job: 16,
        // Loopback only: tests never send DNS anywhere else.
        dns_upstreams: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
        ..Default::default()
    }
}

/// Debian 13's engine as `scripts/debian13-parts engine` unpacks it.
pub const DEBIAN13_ENGINE: &str = "/opt/berth/engines/debian13";

/// `cfg` with Debian 13's dockerd and containerd (the host's runc); fails
/// loudly when they are not installed.
pub fn with_debian13_engine(mut cfg: SandboxConfig) -> SandboxConfig {
    let dockerd = Path::new(DEBIAN13_ENGINE).join("usr/sbin/dockerd");
    assert!(
        dockerd.exists(),
        "{} is missing: run scripts/debian13-parts engine",
        dockerd.display()
    );
    cfg.dockerd = dockerd;
    cfg.containerd = Path::new(DEBIAN13_ENGINE).join("usr/bin/containerd");
    cfg
}

pub fn engine(n: u32, name: &str) -> Engine {
    Engine::new(engine_config(n, name)).expect("engine")
}

/// Runs the docker CLI against a job's socket.
pub fn docker(sock: &Path, args: &[&str]) -> Output {
    docker_stdin(sock, args, None)
}

pub fn docker_stdin(sock: &Path, args: &[&str], input: Option<&[u8]>) -> Output {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH");
    run_docker(c, args, input)
}

/// Runs a prepared docker CLI command with `args`, feeding `input` (then
/// EOF) to its stdin.
fn run_docker(mut c: Command, args: &[&str], input: Option<&[u8]>) -> Output {
    c.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn docker");
    if let Some(bytes) = input {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(bytes).unwrap();
        drop(stdin);
    }
    child.wait_with_output().expect("docker output")
}

/// Runs docker and returns stdout, panicking with stderr on failure.
pub fn docker_ok(sock: &Path, args: &[&str]) -> String {
    stdout_of_success(docker(sock, args), args)
}

fn stdout_of_success(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tarball of a busybox rootfs (Debian's busybox-static, every applet a
/// link to it), built once per test process.
pub fn busybox_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("berth-busybox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            // `busybox` is itself in the list: linking it would replace the binary.
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
            }
        }
        let out = Command::new("tar")
            .args(["-C", root.to_str().unwrap(), "-c", "."])
            .output()
            .unwrap();
        assert!(out.status.success(), "tar failed");
        let _ = std::fs::remove_dir_all(&root);
        out.stdout
    })
}

/// Imports the busybox rootfs as `busybox:test` into the job behind `sock`.
/// `docker import` of the busybox root as `busybox:test`.
const IMPORT_BUSYBOX: &[&str] = &["import", "--change", "ENV PATH=/bin", "-", "busybox:test"];

pub fn import_busybox(sock: &Path) {
    let out = docker_stdin(sock, IMPORT_BUSYBOX, Some(busybox_tar()));
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same over mutual TLS, with a job's certificate.
pub fn import_busybox_tls(job: &TlsJob) {
    let o = docker_tls_stdin(job, IMPORT_BUSYBOX, Some(busybox_tar()));
    assert!(
        o.status.success(),
        "docker import in {}: {}",
        job.id,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `docker run --rm` of a container that asks for 500 MB at once (more
/// than a small memory bound allows).
pub const RUN_HOG_500M: &[&str] = &[
    "run",
    "--rm",
    "busybox:test",
    "dd",
    "if=/dev/zero",
    "of=/dev/null",
    "bs=500M",
    "count=1",
];

/// A container that writes 200 MB to its own layer, as `docker run` args
/// to follow `run` and its flags.
pub const WRITE_200MB: &[&str] = &[
    "busybox:test",
    "dd",
    "if=/dev/zero",
    "of=/big",
    "bs=1M",
    "count=200",
];

/// What a job might leave on the host, captured while it runs.
pub struct Traces {
    pub id: String,
    pub pids: Vec<u32>,
    /// The job's network namespace, held open: while held, its inode
    /// number cannot be reused by a namespace made after the job's end.
    pub net_ns: Option<std::fs::File>,
    pub job_dir: PathBuf,
    pub state_dir: PathBuf,
    pub slot: u32,
    /// The job's limit cgroups (one per hierarchy), wherever its home is.
    pub cgroups: Vec<PathBuf>,
}

impl Traces {
    pub fn capture(engine: &Engine, sb: &berth::sandbox::Sandbox) -> Traces {
        let pids = sb.pids();
        assert!(!pids.is_empty(), "a live job has processes");
        let init = sb.record().init_pid.expect("init pid");
        let net_ns = std::fs::File::open(format!("/proc/{init}/ns/net")).ok();
        Traces {
            id: sb.id().to_string(),
            pids,
            net_ns,
            job_dir: engine.config().state_dir.join("jobs").join(sb.id()),
            state_dir: engine.config().state_dir.clone(),
            slot: sb.record().slot,
            cgroups: sb
                .record()
                .cgroup
                .map(|c| c.limit_dirs())
                .unwrap_or_default(),
        }
    }

    /// Scans /proc, every mountinfo, cgroupfs, links and iptables for the job.
    pub fn assert_gone(&self) {
        let id = &self.id;
        for p in &self.pids {
            let stat = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
            assert!(
                !stat.contains(id.as_str()),
                "process {p} of job {id} survived"
            );
        }
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            assert!(
                !cg.contains(id.as_str()),
                "pid {pid} is still in a cgroup of job {id}"
            );
            let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
            assert!(
                !mi.contains(id.as_str()),
                "pid {pid} still sees a mount of job {id}"
            );
            if let (Some(ns), Ok(m)) = (
                self.net_ns.as_ref().and_then(|f| f.metadata().ok()),
                std::fs::metadata(format!("/proc/{pid}/ns/net")),
            ) {
                let ns = std::os::unix::fs::MetadataExt::ino(&ns);
                assert_ne!(
                    std::os::unix::fs::MetadataExt::ino(&m),
                    ns,
                    "pid {pid} is still in job {id}'s network namespace"
                );
            }
        }
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let d = h.path().join("berth").join(id);
            assert!(!d.exists(), "cgroup {} survived", d.display());
        }
        for d in &self.cgroups {
            assert!(!d.exists(), "cgroup {} survived", d.display());
        }
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let short = &id[..12.min(id.len())];
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains(short),
            "a link of job {id} survived"
        );
        for table in ["filter", "nat"] {
            let rules = Command::new("iptables")
                .args(["-w", "-t", table, "-S"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&rules.stdout);
            assert!(
                !text.contains(id.as_str()),
                "an iptables rule of job {id} survived: {text}"
            );
        }
        assert!(
            !self.job_dir.exists(),
            "{} survived",
            self.job_dir.display()
        );
        // No loop device still backs the job's disk image.
        for dev in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let backing =
                std::fs::read_to_string(dev.path().join("loop/backing_file")).unwrap_or_default();
            assert!(
                !backing.contains(id.as_str()),
                "{} still backs {backing}",
                dev.file_name().to_string_lossy()
            );
        }
        assert!(
            !self
                .state_dir
                .join("slots")
                .join(self.slot.to_string())
                .exists(),
            "slot {} of job {id} was not released",
            self.slot
        );
    }
}

/// Runs `ip ARGS`, panicking with its error output if it fails.
pub fn ip_ok(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace that plays "the outside world" for egress tests:
/// `10.215.<n>.2` inside, `10.215.<n>.1` on the host end.
pub struct Outside {
    pub name: String,
    host_if: String,
    pub addr: Ipv4Addr,
}

impl Outside {
    pub fn create(n: u8) -> Outside {
        let name = format!("bt-out{n}");
        let host_if = format!("bto{n}h");
        let peer = format!("bto{n}n");
        // What an interrupted earlier run left, if anything (usually
        // nothing: the commands' complaints are noise).
        for args in [["netns", "del", &name], ["link", "del", &host_if]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
        ip_ok(&["netns", "add", &name]);
        ip_ok(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip_ok(&["link", "set", &peer, "netns", &name]);
        ip_ok(&["addr", "add", &format!("10.215.{n}.1/24"), "dev", &host_if]);
        ip_ok(&["link", "set", &host_if, "up"]);
        ip_ok(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.215.{n}.2/24"),
            "dev",
            &peer,
        ]);
        ip_ok(&["-n", &name, "link", "set", &peer, "up"]);
        ip_ok(&["-n", &name, "link", "set", "lo", "up"]);
        Outside {
            name,
            host_if,
            addr: Ipv4Addr::new(10, 215, n, 2),
        }
    }

    /// Binds a TCP listener inside the namespace (the listening socket
    /// stays in that namespace).
    fn listen(&self, port: u16) -> std::net::TcpListener {
        in_netns(&self.name, || {
            std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
        })
    }

    /// Answers every connection on `port` with `reply`, then closes it.
    pub fn serve_reply(&self, port: u16, reply: &'static str) {
        let l = self.listen(port);
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                use std::io::Write;
                let mut c = c;
                let _ = c.write_all(reply.as_bytes());
            }
        });
    }

    /// Counts the bytes of the first connection on `port` until EOF.
    pub fn serve_count(&self, port: u16) -> std::thread::JoinHandle<u64> {
        let l = self.listen(port);
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            std::io::copy(&mut c, &mut std::io::sink()).unwrap()
        })
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// Runs `f` on a thread that has joined the named network namespace
/// (`ip netns`): sockets it makes stay in that namespace.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// A DNS server on loopback that answers every A question with `answer`.
pub fn spawn_dns(answer: Ipv4Addr) -> SocketAddr {
    dns_server(Some(answer))
}

/// A DNS server on loopback that knows no name (NXDOMAIN at once): what a
/// job resolves fails fast instead of waiting for a silent resolver.
pub fn spawn_dns_nxdomain() -> SocketAddr {
    dns_server(None)
}

fn dns_server(answer: Option<Ipv4Addr>) -> SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            // Header: same id, QR|RD|RA, one question, one answer.
            let mut r = Vec::with_capacity(n + 16);
            r.extend_from_slice(&buf[0..2]);
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
            // The question as asked (name, type, class).
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += buf[i] as usize + 1;
            }
            let qend = (i + 5).min(n);
            r.extend_from_slice(&buf[12..qend]);
            let qtype = if qend >= 4 {
                u16::from_be_bytes([buf[qend - 4], buf[qend - 3]])
            } else {
                0
            };
            let Some(answer) = answer.filter(|_| qtype == 1) else {
                // No records; no such name when the server knows none.
                r[7] = 0;
                if answer.is_none() {
                    r[3] |= 3;
                }
                let _ = sock.send_to(&r, peer);
                continue;
            };
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            r.extend_from_slice(&answer.octets());
            let _ = sock.send_to(&r, peer);
        }
    });
    addr
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A real front door (`berth::frontdoor::Server`) on 127.0.0.1:<ephemeral> with
/// its own engine and certs dir, served from a background runtime. Dropping
/// it shuts the server down, which tears down its jobs.
pub struct FrontDoor {
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless a test chose another).
    pub ip: std::net::IpAddr,
    pub certs: PathBuf,
    /// The token exchange's listener, when the configuration enables it.
    pub token: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A job created through the front door: its id and its certificate dir.
#[derive(Clone)]
pub struct TlsJob {
    pub id: String,
    pub dir: PathBuf,
    pub endpoint: String,
    /// The job's own address and its block of published ports, as
    /// `job create --json` prints them.
    pub address: String,
    pub ports: Option<String>,
}

impl FrontDoor {
    pub fn start(n: u32, name: &str) -> FrontDoor {
        Self::start_with(n, name, |_| {})
    }

    pub fn start_with(
        n: u32,
        name: &str,
        tweak: impl FnOnce(&mut berth::frontdoor::ServeConfig),
    ) -> FrontDoor {
        Self::start_engine(std::sync::Arc::new(engine(n, name)), name, tweak)
    }

    pub fn start_engine(
        engine: std::sync::Arc<Engine>,
        name: &str,
        tweak: impl FnOnce(&mut berth::frontdoor::ServeConfig),
    ) -> FrontDoor {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = PathBuf::from(format!("/var/lib/bt/{name}-certs"));
        let _ = std::fs::remove_dir_all(&certs);
        let mut cfg = berth::frontdoor::ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            certs_dir: certs.clone(),
            warm_pool: 0,
            ..Default::default()
        };
        tweak(&mut cfg);
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let tls = berth::frontdoor::Tls::prepare(&cfg).expect("TLS");
                let server = berth::frontdoor::Server::bind(cfg, tls, engine)
                    .await
                    .expect("bind");
                port_tx
                    .send((server.local_addr(), server.token_addr()))
                    .unwrap();
                server
                    .run(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let (addr, token) = port_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("server up");
        FrontDoor {
            port: addr.port(),
            ip: addr.ip(),
            certs,
            token,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        SocketAddr::new(self.ip, self.port).to_string()
    }

    /// `berth job create` (the real CLI) against this front door.
    pub fn create_job(&self, extra: &[&str]) -> TlsJob {
        let out_dir = self.certs.join(format!("job-{}", rand_suffix()));
        let out = Command::new(berth_bin())
            .args(["job", "create", "--json", "--endpoint", &self.endpoint()])
            .arg("--certs-dir")
            .arg(&self.certs)
            .arg("--out")
            .arg(&out_dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "berth job create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        TlsJob::from_create_json(&v, PathBuf::from(v["cert_path"].as_str().unwrap()))
    }

    /// Runs `berth job <args>` against this front door.
    pub fn job_cli(&self, args: &[&str]) -> Output {
        berth_against(
            &self.endpoint(),
            &self.certs,
            &[&["job"][..], args].concat(),
        )
    }

    /// `berth job create` with the CI platform's token in file `token`,
    /// exchanged at this front door's token listener (trusting its CA),
    /// the job's bundle written beside the token (`<token>.job`).
    pub fn create_with_token(&self, token: &Path, extra: &[&str]) -> Output {
        let at = self.token.expect("the token listener is up").to_string();
        Command::new(berth_bin())
            .args(["job", "create", "--json", "--endpoint", &self.endpoint()])
            .args(["--token-endpoint", &at])
            .arg("--token")
            .arg(token)
            .arg("--ca")
            .arg(self.certs.join("ca/cert.pem"))
            .arg("--out")
            .arg(token.with_extension("job"))
            .args(extra)
            .output()
            .unwrap()
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl TlsJob {
    /// The job `berth job create --json` printed, its bundle in `dir`.
    pub fn from_create_json(v: &serde_json::Value, dir: PathBuf) -> TlsJob {
        TlsJob {
            id: v["id"].as_str().expect("id").to_string(),
            dir,
            endpoint: v["endpoint"].as_str().expect("endpoint").to_string(),
            address: v["address"].as_str().expect("address").to_string(),
            ports: v["ports"].as_str().map(String::from),
        }
    }
}

/// The docker CLI over mutual TLS with a job's certificate.
pub fn docker_tls(job: &TlsJob, args: &[&str]) -> Output {
    docker_tls_stdin(job, args, None)
}

pub fn docker_tls_stdin(job: &TlsJob, args: &[&str], input: Option<&[u8]>) -> Output {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", &job.endpoint)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &job.dir);
    run_docker(c, args, input)
}

pub fn docker_tls_ok(job: &TlsJob, args: &[&str]) -> String {
    stdout_of_success(docker_tls(job, args), args)
}

/// Imports the busybox base image and builds `big:1`, 400 MB of random bytes
/// (nothing on the path can compress them away), in the job.
pub fn build_big_image(job: &TlsJob, ctx: &Path) {
    let o = docker_tls_stdin(
        job,
        &["import", "--change", "ENV PATH=/bin", "-", "busybox:test"],
        Some(busybox_tar()),
    );
    assert!(o.status.success(), "import");
    std::fs::create_dir_all(ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test\nRUN head -c 400000000 /dev/urandom > /big\n",
    )
    .unwrap();
    docker_tls_ok(job, &["build", "-q", "-t", "big:1", ctx.to_str().unwrap()]);
}

/// A raw TLS connection to the front door with an optional client bundle.
pub async fn tls_connect(
    port: u16,
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(std::io::Error::other)?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(std::io::Error::other)?;
            b.with_client_auth_cert(chain, key)
                .map_err(std::io::Error::other)?
        }
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await?;
    // TLS 1.3 reports a refused client certificate only on the first read.
    use tokio::io::AsyncWriteExt;
    s.flush().await?;
    Ok(s)
}

/// One HTTP/1.1 request over a fresh TLS connection; returns the whole answer.
pub async fn tls_request(port: u16, bundle_dir: &Path, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = std::fs::read(bundle_dir.join("ca.pem"))?;
    let cert = std::fs::read(bundle_dir.join("cert.pem"))?;
    let key = std::fs::read(bundle_dir.join("key.pem"))?;
    let mut s = tls_connect(port, &ca, Some((&cert, &key))).await?;
    s.write_all(raw).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    Ok(out)
}

/// Writes a berth.toml for test `n` (its own state dir and pools) and
/// returns its path.
pub fn write_config(n: u32, name: &str, extra_sandbox: &str) -> PathBuf {
    let cfg = engine_config(n, name);
    std::fs::create_dir_all("/var/lib/bt").unwrap();
    let path = PathBuf::from(format!("/var/lib/bt/{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[sandbox]\nstate_dir = {:?}\nuid_base = {}\nuid_ranges = {}\nnet_pool = \"{}\"\nnet_pool_prefix = {}\nport_pool = \"{}\"\nports_per_job = {}\ndns_upstreams = [\"127.0.0.1:9\"]\n{extra_sandbox}\n",
            cfg.state_dir,
            cfg.uid_base,
            cfg.uid_ranges,
            cfg.net_pool,
            cfg.net_pool_prefix,
            cfg.port_pool,
            cfg.ports_per_job
        ),
    )
    .unwrap();
    path
}

/// Job directories left in a state dir.
pub fn jobs_left(name: &str) -> Vec<String> {
    std::fs::read_dir(format!("/var/lib/bt/{name}/jobs"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A private CA and a server certificate it signed for `ip`, as PEM: the
/// CA's certificate, the server's certificate and the server's key.
pub fn private_ca_for(ip: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv = rcgen::CertificateParams::new(vec![ip.to_string()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    (ca_cert.pem(), srv.pem(), srv_key.serialize_pem())
}

/// Debian's `docker-registry` in a test host's namespace, on `addr`, its
/// storage in `dir`; TLS and htpasswd when given. Killed on drop.
pub struct Registry {
    child: std::process::Child,
    pub dir: std::path::PathBuf,
}

impl Registry {
    pub fn start(
        netns: &str,
        name: &str,
        addr: &str,
        tls: Option<(&str, &str)>,
        htpasswd: Option<&std::path::Path>,
    ) -> Registry {
        assert!(
            std::path::Path::new("/usr/bin/docker-registry").exists(),
            "/usr/bin/docker-registry is missing: apt-get install docker-registry"
        );
        let dir = std::path::PathBuf::from(format!("/var/lib/bt/registry-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        if let Some((cert, key)) = tls {
            std::fs::write(dir.join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
            yml += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            );
        }
        if let Some(h) = htpasswd {
            yml += &format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                h.display()
            );
        }
        std::fs::write(dir.join("config.yml"), yml).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "docker-registry", "serve"])
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        // Up when it accepts connections.
        let sa: SocketAddr = addr.parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while in_netns(netns, || {
            std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1))
        })
        .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "registry {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, dir }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Registry {
    /// Lines of its log with `needle`: the requests it was asked.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(self.dir.join("log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// Debian 13's static busybox for arm64 (`scripts/debian13-parts
/// busybox-arm64`), or `BERTH_TEST_ARM64_BUSYBOX` (the guest lanes' copy).
pub fn arm64_busybox() -> PathBuf {
    std::env::var_os("BERTH_TEST_ARM64_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/berth/arm64/busybox"))
}

/// The host's arm64 handler; fails with the fix when there is none.
pub fn require_host_arm64() -> berth::sandbox::binfmt::Handler {
    let hs = berth::sandbox::binfmt::handlers(Path::new(berth::sandbox::binfmt::MOUNT)).unwrap();
    let h = hs
        .into_iter()
        .find(|h| h.enabled && h.arch() == Some("arm64"))
        .expect(
            "the host has no arm64 binfmt_misc handler: apt-get install qemu-user-static \
             binfmt-support, then update-binfmts --enable (see the README's emulation section)",
        );
    assert!(
        h.fixed(),
        "the host's arm64 handler has no F flag: {h:?} (Debian's qemu-user-binfmt registers \
         without it; install qemu-user-static)"
    );
    h
}

/// The arm64 image [`arm64_busybox_tar`] holds.
pub const ARM64_IMAGE: &str = "arm64-busybox:test";

fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A `docker save` archive of an arm64 image (its config says so): Debian's
/// arm64 static busybox with its applets, tagged [`ARM64_IMAGE`]. Built
/// once per test process: tests running at once share it.
pub fn arm64_busybox_tar() -> Vec<u8> {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(build_arm64_busybox_tar).clone()
}

fn build_arm64_busybox_tar() -> Vec<u8> {
    let busybox = arm64_busybox();
    assert!(
        busybox.exists(),
        "{} is missing: run scripts/debian13-parts busybox-arm64",
        busybox.display()
    );
    let dir = std::env::temp_dir().join(format!("berth-arm64-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::copy(&busybox, rootfs.join("bin/busybox")).unwrap();
    // The applets of this host's busybox (Debian 12's list: a subset of
    // Debian 13's).
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
    }
    let image = dir.join("image");
    std::fs::create_dir_all(image.join("layer")).unwrap();
    let layer = image.join("layer/layer.tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            layer.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let config = serde_json::json!({
        "architecture": "arm64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer))]},
    });
    let config_path = image.join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let config_name = format!("{}.json", sha256(&config_path));
    std::fs::rename(&config_path, image.join(&config_name)).unwrap();
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [ARM64_IMAGE],
        "Layers": ["layer/layer.tar"],
    }]);
    std::fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
    let tar = Command::new("tar")
        .args(["-C", image.to_str().unwrap(), "-c", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    tar.stdout
}

/// Fails, naming the fix, unless each command runs and succeeds: the
/// tools a test drives beside berth (`[(argv, fix)]`).
pub fn require_tools(tools: &[(&[&str], &str)]) {
    for (argv, fix) in tools {
        assert!(
            Command::new(argv[0])
                .args(&argv[1..])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{argv:?} failed: {fix}"
        );
    }
}

/// A signing key made for the test, its JWK public half published in the
/// issuer's JWKS file.
pub struct TestKey {
    pub alg: jsonwebtoken::Algorithm,
    pub kid: &'static str,
    pub key: jsonwebtoken::EncodingKey,
    pub public_pem: Vec<u8>,
}

pub fn test_key(dir: &Path, alg: jsonwebtoken::Algorithm, kid: &'static str) -> TestKey {
    let (file, args): (_, &[&str]) = match alg {
        jsonwebtoken::Algorithm::RS256 => (
            "rsa.pem",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        ),
        _ => (
            "ec.pem",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
    };
    let path = dir.join(file);
    let o = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&path)
        .output()
        .expect("openssl (the test's key maker) is missing: apt-get install openssl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pem = std::fs::read(&path).unwrap();
    let public_pem = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .unwrap()
        .stdout;
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
    }
    .unwrap();
    TestKey {
        alg,
        kid,
        key,
        public_pem,
    }
}

pub fn jwk(k: &TestKey) -> serde_json::Value {
    let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(&k.key, k.alg).unwrap();
    j.common.key_id = Some(k.kid.into());
    serde_json::to_value(j).unwrap()
}

pub fn mint(k: &TestKey, claims: &serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(k.alg);
    h.kid = Some(k.kid.into());
    jsonwebtoken::encode(&h, claims, &k.key).unwrap()
}

/// `berth serve --config CFG --certs-dir CERTS` started as systemd starts
/// a socket-activated service: its listening socket on fd 3. Returns the
/// agent and its port.
pub fn serve_activated_with(
    cfg: &Path,
    certs: &Path,
    env: &[(&str, &Path)],
) -> (std::process::Child, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // As systemd does: the socket on fd 3, LISTEN_PID = the service's pid.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {} serve --config {} --certs-dir {}",
            berth_bin().display(),
            cfg.display(),
            certs.display()
        ))
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only dup2/fcntl between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // dup2(3, 3) would keep close-on-exec: clear it instead.
            let r = if fd == 3 {
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
    let agent = cmd.spawn().unwrap();
    drop(listener);
    (agent, port)
}

/// A process's resident memory (all of it, and its heap and other
/// anonymous pages alone) and open descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub rss: u64,
    pub anon: u64,
    pub fds: usize,
}

/// What process `pid` holds now.
pub fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |field: &str| -> u64 {
        kib_field(&status, field).unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    };
    Footprint {
        rss: kib("VmRSS") * 1024,
        anon: kib("RssAnon") * 1024,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
    }
}

/// `berth ARGS --endpoint ENDPOINT --certs-dir CERTS`: the CLI against an
/// agent with its admin bundle.
pub fn berth_against(endpoint: &str, certs: &Path, args: &[&str]) -> Output {
    Command::new(berth_bin())
        .args(args)
        .args(["--endpoint", endpoint])
        .arg("--certs-dir")
        .arg(certs)
        .output()
        .unwrap()
}

/// `berth serve` as a process of its own (socket-activated, as systemd
/// starts it), its port and admin bundle; for what measures the agent apart
/// from its clients. Dropping it stops it (SIGTERM), so a failed test
/// leaves its state dir to the next run.
pub struct Agent {
    child: std::process::Child,
    pub port: u16,
    pub certs: PathBuf,
}

impl Agent {
    /// Starts the agent and waits until it serves the job API; its log
    /// goes to `log`, drained as it comes (a full pipe would stall it).
    pub fn start(cfg: &Path, certs: &Path, log: &Path) -> Agent {
        let (mut child, port) = serve_activated_with(cfg, certs, &[]);
        let mut err = child.stderr.take().unwrap();
        let mut f = std::fs::File::create(log).unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut f);
        });
        let agent = Agent {
            child,
            port,
            certs: certs.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !agent.cli(&["job", "ls"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not serve; its log: {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `berth ARGS --endpoint … --certs-dir …` against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        berth_against(&self.endpoint(), &self.certs, args)
    }

    /// `berth job create --json ARGS`: the job and its bundle.
    pub fn create(&self, args: &[&str]) -> TlsJob {
        let o = self.cli(&[&["job", "create", "--json"][..], args].concat());
        assert!(
            o.status.success(),
            "job create: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        TlsJob::from_create_json(&v, v["cert_path"].as_str().unwrap().into())
    }

    /// `berth job rm --outcome success`, and its bundle removed.
    pub fn remove(&self, job: &TlsJob) {
        let o = self.cli(&["job", "rm", "--outcome", "success", &job.id]);
        assert!(
            o.status.success(),
            "job rm {}: {}",
            job.id,
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = std::fs::remove_dir_all(&job.dir);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the agent gone at once, its jobs left for the next one to
    /// recover.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, as systemd stops it; the agent tears its jobs down.
    pub fn stop(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the agent stopped with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// The agent's metrics, scraped as Prometheus does and parsed by the
/// Prometheus project's own OpenMetrics parser (prometheus_client, from
/// PyPI): `{name: [[sample, labels, value], ...]}`.
pub fn scrape(fd: &FrontDoor) -> serde_json::Value {
    let text = metrics_response(fd.port, &fd.certs);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let parse = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.setdefault(s.name, []).append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let o = docker_stdin_cmd("python3", &["-c", parse], body.as_bytes());
    assert!(
        o.status.success(),
        "the OpenMetrics parser refused the exposition (python3 -m pip install prometheus-client): {}\n{body}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `GET /berth/v1/metrics` with the admin bundle in `certs`, from the agent
/// at 127.0.0.1:`port`: the whole HTTP response.
pub fn metrics_response(port: u16, certs: &Path) -> String {
    let raw = rt()
        .block_on(tls_request(
            port,
            &certs.join("admin"),
            b"GET /berth/v1/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ))
        .unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

/// Runs `prog args` with `input` on its standard input.
pub fn docker_stdin_cmd(prog: &str, args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut c = Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    c.wait_with_output().unwrap()
}

/// The value of `sample` whose labels include `labels`.
pub fn sample(m: &serde_json::Value, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m.as_object()?
        .values()
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .find_map(|s| {
            let ok = s[0] == sample && labels.iter().all(|(k, v)| s[1][*k] == *v);
            ok.then(|| s[2].as_f64()).flatten()
        })
}

/// A `/proc` file's `Field:   123 kB` line (`/proc/PID/status`,
/// `/proc/meminfo`): its number, in KiB.
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
