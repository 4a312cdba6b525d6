//! What a job's network looks like from outside: published ports at every
//! address of the agent's host (and nowhere else), and TCP through networks
//! whose MTU is larger than the path's. Real dockerd, real CLI, test hosts in
//! network namespaces the tests make.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Whatever `addr` sends on one connection, or the connect error.
fn read_from(addr: SocketAddr) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    Ok(s)
}

/// Connects to `addr` until it sends `want` (a container's server may take a
/// moment to listen); panics after a bound far from any load.
fn answers(addr: SocketAddr, want: &str) {
    answers_at(&[addr], want)
}

/// Like `answers`, for a name that resolves to several addresses: one of
/// them must answer.
fn answers_at(addrs: &[SocketAddr], want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        for addr in addrs {
            match read_from(*addr) {
                Ok(s) if s.contains(want) => return,
                Ok(s) => last = format!("{addr} sent {s:?}"),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addrs:?} never answered {want:?}: {last}");
}

/// Connects to `addr` until it is refused (a port closing); panics after a
/// bound far from any load.
fn refused(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        match read_from(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Err(e) => last = e.to_string(),
            Ok(s) => last = format!("it answered {s:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} was not refused: {last}");
}

/// The host port `docker port` shows for the container's `port`.
fn published(sock: &std::path::Path, container: &str, port: &str) -> u16 {
    let out = docker_ok(sock, &["port", container, port]);
    out.lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("docker port {container} {port}: {out:?}"))
}

fn serve(sock: &std::path::Path, name: &str, publish: &str, port: u16, reply: &str) {
    docker_ok(
        sock,
        &[
            "run",
            "-d",
            "--name",
            name,
            "-p",
            publish,
            "busybox:test",
            // A server that answers every connection (each in a process
            // of its own), with no gap between two.
            "nc",
            "-ll",
            "-p",
            &port.to_string(),
            "-e",
            "echo",
            reply,
        ],
    );
}

#[test]
fn published_ports_answer_at_every_address_of_the_agents_host_and_only_there() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    // A remote CI runner: a network namespace that reaches the agent's host
    // at 10.215.13.1.
    let runner = Outside::create(13);
    let agent_addr = Ipv4Addr::new(10, 215, 13, 1);
    let e = engine(13, "ports");
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    let (sa, sbk) = (a.socket(), b.socket());
    import_busybox(&sa);
    import_busybox(&sbk);
    let (block_a, block_b) = (a.record().ports.unwrap(), b.record().ports.unwrap());
    assert!(
        block_a.last < block_b.first || block_b.last < block_a.first,
        "{block_a} and {block_b} overlap"
    );

    // Docker picks the host port (`-p 8080`): from A's block.
    serve(&sa, "web", "8080", 8080, "from-a");
    let p = published(&sa, "web", "8080/tcp");
    assert!(block_a.contains(p), "{p} is outside A's block {block_a}");
    // From the agent's host: loopback, `localhost`, another of its addresses.
    answers(SocketAddr::from(([127, 0, 0, 1], p)), "from-a");
    let localhost: Vec<SocketAddr> = ("localhost", p).to_socket_addrs().unwrap().collect();
    answers_at(&localhost, "from-a");
    answers(SocketAddr::from((agent_addr, p)), "from-a");
    // From the remote runner, through the agent's address.
    let remote = in_netns(&runner.name, || {
        read_from(SocketAddr::from((agent_addr, p)))
    });
    assert!(
        remote.as_ref().is_ok_and(|s| s.contains("from-a")),
        "the remote runner got {remote:?}"
    );
    // `docker run -P` takes from the block too.
    let all = docker_ok(
        &sa,
        &[
            "run",
            "-d",
            "--expose",
            "9000",
            "-P",
            "busybox:test",
            "sleep",
            "3600",
        ],
    );
    let pp = published(&sa, all.trim(), "9000/tcp");
    assert!(block_a.contains(pp), "-P gave {pp}, outside {block_a}");

    // Only what the job publishes opens: the rest of its block is refused,
    // from the host and from the runner.
    let unused = (block_a.first..=block_a.last)
        .find(|q| *q != p && *q != pp)
        .unwrap();
    refused(SocketAddr::from(([127, 0, 0, 1], unused)));
    let r = in_netns(&runner.name, || {
        read_from(SocketAddr::from((agent_addr, unused)))
    });
    assert!(
        r.is_err(),
        "an unpublished port of A answered the runner: {r:?}"
    );

    // A fixed host port outside the block binds inside the job only: at the
    // job's own address, never at the agent's.
    serve(&sa, "fixed", "7000:7000", 7000, "fixed-a");
    answers(SocketAddr::from((a.record().job_ip, 7000)), "fixed-a");
    refused(SocketAddr::from(([127, 0, 0, 1], 7000)));

    // No job reaches another job's published ports, by any address of the
    // host.
    for target in [b.record().host_ip, agent_addr, a.record().job_ip] {
        let out = docker(
            &sbk,
            &[
                "run",
                "--rm",
                "busybox:test",
                "nc",
                "-w",
                "3",
                &target.to_string(),
                &p.to_string(),
            ],
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("from-a"),
            "B reached A's port {p} at {target}"
        );
    }
    // B's published port is its own.
    serve(&sbk, "web", "8080", 8080, "from-b");
    let pb = published(&sbk, "web", "8080/tcp");
    assert!(block_b.contains(pb), "{pb} is outside B's block {block_b}");
    answers(SocketAddr::from(([127, 0, 0, 1], pb)), "from-b");

    // Ports close with the container...
    docker_ok(&sa, &["rm", "-f", "web"]);
    refused(SocketAddr::from(([127, 0, 0, 1], p)));
    // ...and with the job: its forwarding rules go with it.
    let traces = Traces::capture(&e, &a);
    rt.block_on(e.teardown(a.id())).unwrap();
    traces.assert_gone();
    refused(SocketAddr::from(([127, 0, 0, 1], pp)));
    answers(SocketAddr::from(([127, 0, 0, 1], pb)), "from-b");
    rt.block_on(e.teardown(b.id())).unwrap();
}

/// A path with a small MTU that drops ICMP "fragmentation needed": the
/// host reaches a router namespace over a 1400-byte link; behind the router,
/// a server namespace on a 1500-byte link. The router sends no ICMP error
/// back to the server, so a server that sends 1500-byte packets stalls.
struct NarrowPath {
    router: String,
    server: String,
    host_if: String,
    net: String,
    server_addr: Ipv4Addr,
}

impl NarrowPath {
    fn create(n: u8) -> NarrowPath {
        let (router, server) = (format!("bt-rt{n}"), format!("bt-sv{n}"));
        let host_if = format!("btr{n}h");
        for ns in [&router, &server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        let in_ns = |ns: &str, args: &[&str]| ip_ok(&[&["netns", "exec", ns], args].concat());
        let net = format!("10.216.{n}");
        ip_ok(&["netns", "add", &router]);
        ip_ok(&["netns", "add", &server]);
        // host <-> router: 1400.
        ip_ok(&[
            "link", "add", &host_if, "mtu", "1400", "type", "veth", "peer", "name", "rt-h", "mtu",
            "1400",
        ]);
        ip_ok(&["link", "set", "rt-h", "netns", &router]);
        ip_ok(&["addr", "add", &format!("{net}.1/30"), "dev", &host_if]);
        ip_ok(&["link", "set", &host_if, "up"]);
        // router <-> server: 1500.
        ip_ok(&[
            "-n", &router, "link", "add", "rt-s", "mtu", "1500", "type", "veth", "peer", "name",
            "sv", "mtu", "1500",
        ]);
        ip_ok(&["-n", &router, "link", "set", "sv", "netns", &server]);
        for (ns, cmds) in [
            (
                &router,
                vec![
                    format!("addr add {net}.2/30 dev rt-h"),
                    format!("addr add {net}.5/30 dev rt-s"),
                    "link set rt-h up".into(),
                    "link set rt-s up".into(),
                    "link set lo up".into(),
                    format!("route add default via {net}.1"),
                ],
            ),
            (
                &server,
                vec![
                    format!("addr add {net}.6/30 dev sv"),
                    "link set sv up".into(),
                    "link set lo up".into(),
                    format!("route add default via {net}.5"),
                ],
            ),
        ] {
            for c in cmds {
                let args: Vec<&str> = c.split(' ').collect();
                let mut full = vec!["-n", ns.as_str()];
                full.extend(args);
                ip_ok(&full);
            }
        }
        in_ns(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // The black hole: no "fragmentation needed" ever leaves the router.
        in_ns(
            &router,
            &[
                "iptables",
                "-w",
                "-A",
                "OUTPUT",
                "-p",
                "icmp",
                "--icmp-type",
                "fragmentation-needed",
                "-j",
                "DROP",
            ],
        );
        ip_ok(&[
            "route",
            "add",
            &format!("{net}.4/30"),
            "via",
            &format!("{net}.2"),
        ]);
        NarrowPath {
            router,
            server,
            host_if,
            net,
            server_addr: Ipv4Addr::new(10, 216, n, 6),
        }
    }

    /// Serves `bytes` zero bytes to every connection on `port`.
    fn serve_bytes(&self, port: u16, bytes: usize) {
        let l = in_netns(&self.server, || {
            std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
        });
        std::thread::spawn(move || {
            let chunk = vec![0u8; 64 * 1024];
            for c in l.incoming().flatten() {
                std::thread::spawn({
                    let chunk = chunk.clone();
                    move || {
                        use std::io::Write;
                        let mut c = c;
                        let mut left = bytes;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if c.write_all(&chunk[..n]).is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                });
            }
        });
    }
}

impl Drop for NarrowPath {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", &format!("{}.4/30", self.net)])
            .status();
        for ns in [&self.server, &self.router] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

#[test]
fn a_compose_network_downloads_through_a_path_whose_mtu_is_smaller_and_drops_icmp() {
    if !prerequisites() {
        return;
    }
    let path = NarrowPath::create(14);
    const SIZE: usize = 4 << 20;
    path.serve_bytes(9000, SIZE);
    let rt = rt();
    let e = berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
        // Job links as narrow as the path.
        mtu: 1400,
        ..engine_config(14, "mtu")
    })
    .unwrap();
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);
    // What every compose project gets: a user-defined network, whose MTU
    // dockerd 20.10 leaves at 1500 whatever --mtu says.
    docker_ok(&s, &["network", "create", "proj_default"]);
    let script = format!(
        "cat /sys/class/net/eth0/mtu; \
         timeout 120 nc {} 9000 </dev/null | wc -c",
        path.server_addr
    );
    let out = docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "--network",
            "proj_default",
            "busybox:test",
            "sh",
            "-c",
            &script,
        ],
    );
    let mut lines = out.lines().map(str::trim);
    let mtu = lines.next().unwrap_or_default();
    let got = lines.next().unwrap_or_default();
    assert!(
        mtu.parse::<u32>().is_ok_and(|m| m > 1400),
        "the premise: the container's network is wider than the path ({mtu})"
    );
    assert_eq!(
        got,
        SIZE.to_string(),
        "the download stalled: {got} of {SIZE} bytes arrived"
    );
    rt.block_on(e.teardown(sb.id())).unwrap();
}

#[test]
fn registry_settings_reach_every_job_private_ca_insecure_and_mirror() {
    if !prerequisites() {
        return;
    }
    let host = Outside::create(16);
    let ip = host.addr.to_string();
    // A private CA and a server certificate for the test host's address.
    let (ca_pem, cert_pem, key_pem) = private_ca_for(&ip);
    let work = std::path::PathBuf::from("/var/lib/bt/registries-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let ca_file = work.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let htpasswd = work.join("htpasswd");
    let h = Command::new("htpasswd")
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args(["ci", "s3cret"])
        .output()
        .expect("htpasswd: apt-get install apache2-utils");
    assert!(h.status.success());
    let private = format!("{ip}:5443");
    let unlisted = format!("{ip}:5444");
    let plain = format!("{ip}:5000");
    let _tls = Registry::start(
        &host.name,
        "private",
        &private,
        Some((&cert_pem, &key_pem)),
        Some(&htpasswd),
    );
    // The same CA, but a registry the configuration does not name.
    let _other = Registry::start(
        &host.name,
        "unlisted",
        &unlisted,
        Some((&cert_pem, &key_pem)),
        None,
    );
    let _plain = Registry::start(&host.name, "plain", &plain, None, None);

    // The section as an operator writes it in berth.toml.
    let toml = format!(
        "[registries]\nmirrors = [\"http://{plain}\"]\ninsecure = [\"{plain}\"]\n\
         [registries.ca]\n\"{private}\" = \"{}\"\n",
        ca_file.display()
    );
    let file: toml::Table = toml::from_str(&toml).unwrap();
    let registries: berth::images::registries::Registries =
        file["registries"].clone().try_into().unwrap();
    let rt = rt();
    let e = berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
        registries,
        ..engine_config(16, "registries")
    })
    .unwrap();
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    let (sa, sbk) = (a.socket(), b.socket());
    import_busybox(&sa);

    let info = docker_ok(&sa, &["info", "--format", "{{json .RegistryConfig}}"]);
    assert!(info.contains(&format!("http://{plain}/")), "{info}");
    // The private registry: its CA verifies it, htpasswd lets the job in.
    let login = docker(&sa, &["login", "-u", "ci", "--password-stdin", &private]);
    assert!(!login.status.success(), "login without a password");
    let login = docker_stdin(
        &sa,
        &["login", "-u", "ci", "--password-stdin", &private],
        Some(b"s3cret"),
    );
    assert!(
        login.status.success(),
        "docker login to the private CA's registry: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    let wrong = docker_stdin(
        &sa,
        &["login", "-u", "ci", "--password-stdin", &private],
        Some(b"wrong"),
    );
    assert!(!wrong.status.success(), "a wrong password was accepted");
    let image = format!("{private}/team/busybox:1");
    docker_ok(&sa, &["tag", "busybox:test", &image]);
    docker_ok(&sa, &["push", &image]);
    // A registry with a certificate of the same CA, but not configured: the
    // CA is trusted for the registry it is named for, and no other.
    docker_ok(&sa, &["tag", "busybox:test", &format!("{unlisted}/x:1")]);
    let push = docker(&sa, &["push", &format!("{unlisted}/x:1")]);
    let why = String::from_utf8_lossy(&push.stderr);
    assert!(
        !push.status.success() && why.contains("x509"),
        "an unlisted registry was trusted: {why}"
    );
    // Plain HTTP: push works where `insecure` lists it.
    let on_plain = format!("{plain}/library/tool:1");
    docker_ok(&sa, &["tag", "busybox:test", &on_plain]);
    docker_ok(&sa, &["push", &on_plain]);

    // Another job has the same settings: it pulls from the private
    // registry with its own login, and Docker Hub names through the mirror.
    let login = docker_stdin(
        &sbk,
        &["login", "-u", "ci", "--password-stdin", &private],
        Some(b"s3cret"),
    );
    assert!(login.status.success());
    docker_ok(&sbk, &["pull", &image]);
    // `tool:1` is docker.io/library/tool:1: only the mirror has it (Docker
    // Hub is not reachable from here).
    let pull = docker(&sbk, &["pull", "tool:1"]);
    let log = std::fs::read_to_string(_plain.dir.join("log")).unwrap();
    assert!(
        pull.status.success(),
        "pull through the mirror: {}\nthe mirror's log: {log}",
        String::from_utf8_lossy(&pull.stderr)
    );
    assert!(docker_ok(&sbk, &["images", "tool"]).contains("tool"));
    // The mirror served it: the plain registry logged the manifest request.
    assert!(
        log.contains("/v2/library/tool/manifests/1 "),
        "the mirror was not asked: {log}"
    );
    rt.block_on(e.teardown(a.id())).unwrap();
    rt.block_on(e.teardown(b.id())).unwrap();
    let _ = std::fs::remove_dir_all(&work);
}

/// Upstream blob downloads the registry logged.
fn blob_gets(r: &Registry) -> usize {
    r.log_count("\"GET /v2/library/tool/blobs/sha256:")
}

#[test]
fn a_shared_pull_through_cache_serves_the_next_job_from_the_host() {
    if !prerequisites() {
        return;
    }
    let host = Outside::create(17);
    let ip = host.addr.to_string();
    let work = std::path::PathBuf::from("/var/lib/bt/cache-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    // An account at the upstream, as at Docker Hub: the cache has it, no job
    // does. (The registry's proxy answers token challenges with it; this
    // upstream asks for none.)
    let password_file = work.join("upstream-password");
    std::fs::write(&password_file, "Upstream-S3cret\n").unwrap();
    let up = format!("{ip}:5000");
    let upstream = Registry::start(&host.name, "cache-upstream", &up, None, None);

    let toml = format!(
        "[cache]\nenabled = true\nupstream = \"http://{up}\"\nmax_bytes = {}\n\
         username = \"mirror-bot\"\npassword_file = \"{}\"\n",
        512u64 << 20,
        password_file.display()
    );
    let file: toml::Table = toml::from_str(&toml).unwrap();
    let cache: berth::images::cache::CacheConfig = file["cache"].clone().try_into().unwrap();
    let cfg = berth::sandbox::SandboxConfig {
        cache,
        // The test pushes the image to the upstream from a job.
        registries: berth::images::registries::Registries {
            insecure: vec![up.clone()],
            ..Default::default()
        },
        ..engine_config(17, "cache")
    };
    let rt = rt();
    let e = berth::sandbox::Engine::new(cfg.clone()).unwrap();
    let addr = e.cache().expect("the cache is enabled").addr();
    let cache_dir = cfg.state_dir.join("cache");

    // The image, on the upstream only.
    let pusher = rt.block_on(e.start(None)).unwrap();
    let ps = pusher.socket();
    import_busybox(&ps);
    let pushed = format!("{up}/library/tool:1");
    docker_ok(&ps, &["tag", "busybox:test", &pushed]);
    docker_ok(&ps, &["push", &pushed]);
    rt.block_on(e.teardown(pusher.id())).unwrap();
    assert_eq!(blob_gets(&upstream), 0);

    // The first job pulls `tool:1` (docker.io/library/tool:1) through the
    // cache, which fetches it from the upstream.
    let a = rt.block_on(e.start(None)).unwrap();
    let info = docker_ok(
        &a.socket(),
        &["info", "--format", "{{json .RegistryConfig.Mirrors}}"],
    );
    assert!(info.contains(&format!("http://{addr}/")), "{info}");
    let pull = docker(&a.socket(), &["pull", "tool:1"]);
    assert!(
        pull.status.success(),
        "pull through the cache: {}\nthe cache's log: {}",
        String::from_utf8_lossy(&pull.stderr),
        std::fs::read_to_string(e.cache().unwrap().log()).unwrap_or_default()
    );
    let fetched = blob_gets(&upstream);
    assert!(
        fetched > 0,
        "the upstream was not asked for the image's blobs"
    );
    rt.block_on(e.teardown(a.id())).unwrap();

    // The next job gets the blobs from the host: the upstream sees no
    // further blob download.
    let b = rt.block_on(e.start(None)).unwrap();
    let bs = b.socket();
    docker_ok(&bs, &["pull", "tool:1"]);
    assert!(docker_ok(&bs, &["images", "tool"]).contains("tool"));
    assert_eq!(
        blob_gets(&upstream),
        fetched,
        "the second pull went to the upstream"
    );
    let served = std::fs::read_to_string(e.cache().unwrap().log()).unwrap();
    assert!(
        served.contains(&format!("{} - - ", b.record().job_ip))
            && served.contains("/v2/library/tool/blobs/sha256:"),
        "the cache did not serve job B: {served}"
    );

    // Nothing of the upstream's login reaches a job: not its daemon's
    // settings, not the cache's files, even from a privileged container
    // with the job's whole filesystem mounted.
    import_busybox(&bs);
    let config = cache_dir.join("config.yml");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let snoop = docker(
        &bs,
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            "/:/host",
            "busybox:test",
            "sh",
            "-c",
            &format!(
                "cat /host{c}; cat /host{s}/cache/storage/docker/registry/v2/repositories/library/tool/_layers/sha256/*/link; grep -rl Upstream-S3cret /host{s}/jobs 2>/dev/null; echo done",
                c = config.display(),
                s = cfg.state_dir.display()
            ),
        ],
    );
    let seen = String::from_utf8_lossy(&snoop.stdout);
    assert!(
        seen.ends_with("done\n"),
        "the container did not run: {seen} {}",
        String::from_utf8_lossy(&snoop.stderr)
    );
    assert!(
        !seen.contains("Upstream-S3cret"),
        "a job read the upstream password: {seen}"
    );
    assert!(
        !seen.contains("sha256:"),
        "a job read the cache's storage: {seen}"
    );
    // Not even there: the job's private root holds nothing of the agent's
    // state or configuration.
    assert!(
        String::from_utf8_lossy(&snoop.stderr).contains("No such file or directory"),
        "{}",
        String::from_utf8_lossy(&snoop.stderr)
    );

    // Only jobs and the host reach the cache: from a remote host routed
    // through the agent's, its address does not answer.
    ip_ok(&[
        "-n",
        &host.name,
        "route",
        "add",
        "default",
        "via",
        "10.215.17.1",
    ]);
    let remote = in_netns(&host.name, || {
        TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
    });
    assert!(remote.is_err(), "the cache answered a remote host");
    TcpStream::connect(addr).expect("the cache answers the agent's host");

    // Its storage is a filesystem of its own, of the bound.
    let st = nix::sys::statvfs::statvfs(&cache_dir.join("storage")).unwrap();
    let total = st.blocks() as u64 * st.fragment_size() as u64;
    assert!(
        total <= 512 << 20 && total > 400 << 20,
        "the cache's filesystem has {total} bytes"
    );
    rt.block_on(e.teardown(b.id())).unwrap();

    // A restarted agent keeps what the cache holds; a stopped one leaves
    // neither its address nor its rules.
    drop(e);
    let save = Command::new("iptables-save").output().unwrap();
    assert!(!String::from_utf8_lossy(&save.stdout).contains("berth-cache-"));
    let lo = Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&lo.stdout).contains(&addr.ip().to_string()));
    // Nor its registry (no connection is tried: the address is not the
    // host's any more).
    let cfg_path = cache_dir.join("config.yml");
    let running = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(&*cfg_path.to_string_lossy()));
    assert!(!running, "the cache's registry outlived its agent");
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let c = rt.block_on(e.start(None)).unwrap();
    docker_ok(&c.socket(), &["pull", "tool:1"]);
    assert_eq!(blob_gets(&upstream), fetched, "a restart lost the cache");
    rt.block_on(e.teardown(c.id())).unwrap();
    drop(e);
    let _ = std::fs::remove_dir_all(&work);
}
