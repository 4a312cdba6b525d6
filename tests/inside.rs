//! docker:dind's inside: a job's own daemon at `/var/run/docker.sock` (and
//! `/run/docker.sock`) for what runs in its containers, as in a
//! `docker:dind` container. Tried with a docker:cli image (the static
//! docker CLI and the compose v2 plugin in a busybox image) as root,
//! `--privileged` and a non-root user given the socket's group, on Debian
//! 12's and Debian 13's engines; and Testcontainers for Python and Node
//! with their defaults (Ryuk on), run from outside the job as a CI job runs
//! them. Runs as root; fails loudly when a prerequisite is missing.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth::sandbox::Engine;
use common::*;

/// The socket as a container mounts it, docker:dind's path.
const SOCK: &str = "/var/run/docker.sock:/var/run/docker.sock";
/// The socket's group in every job (`docker` in the job's /etc/group).
const DOCKER_GID: &str = "999";

/// Copies `bin` to the same path below `root` with the shared libraries it
/// links (none for a static binary), as `ldd` names them.
fn copy_with_libs(bin: &Path, root: &Path, at: &Path) {
    let put = |from: &Path, to: &Path| {
        let dst = root.join(to.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(from, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    put(bin, at);
    let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or the
        // loader's "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            put(Path::new(p), Path::new(p));
        }
    }
}

/// A rootfs tarball standing in for the `docker:cli` image and for
/// testcontainers/ryuk (no registry is reachable here): Debian's static
/// busybox, this host's docker CLI and compose v2 plugin, and the Ryuk
/// stand-in's scripts (tests/clients/ryuk).
fn cli_rootfs_tar() -> Vec<u8> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let root = std::env::temp_dir().join(format!("berth-cli-image-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = Command::new("tar")
        .args(["-x", "-C"])
        .arg({
            std::fs::create_dir_all(&root).unwrap();
            &root
        })
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(busybox_tar())?;
            c.wait()
        })
        .unwrap();
    assert!(out.success(), "unpacking busybox");
    let cli = which("docker").expect("no docker CLI on PATH");
    copy_with_libs(&cli, &root, Path::new("/usr/local/bin/docker"));
    let compose = Path::new("/usr/libexec/docker/cli-plugins/docker-compose");
    assert!(
        compose.exists(),
        "{} is missing: run scripts/debian13-parts plugins",
        compose.display()
    );
    copy_with_libs(
        compose,
        &root,
        Path::new("/usr/local/libexec/docker/cli-plugins/docker-compose"),
    );
    // Carried in the test binary: the guest lanes run it without the tree.
    for (name, text) in [
        ("ryuk", include_str!("clients/ryuk/ryuk")),
        ("ryuk-client", include_str!("clients/ryuk/ryuk-client")),
    ] {
        let at = root.join("bin").join(name);
        std::fs::write(&at, text).unwrap();
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for d in ["var/run", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let tar = Command::new("tar")
        .args(["-C", root.to_str().unwrap(), "-c", "."])
        .output()
        .unwrap();
    assert!(tar.status.success(), "tar failed");
    let _ = std::fs::remove_dir_all(&root);
    tar.stdout
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

/// Imports the stand-in rootfs as `docker:cli` and under each of `ryuk`
/// (the reaper image names the clients ask for), through `docker`.
/// The docker CLI against one job: arguments, standard input.
type DockerCli<'a> = &'a dyn Fn(&[&str], Option<&[u8]>) -> Output;

fn import_cli_images(docker: DockerCli<'_>, ryuk: &[&str]) {
    let tar = cli_rootfs_tar();
    let path = "ENV PATH=/usr/local/bin:/bin";
    let mut names = vec![("docker:cli", "CMD [\"sh\"]")];
    names.extend(ryuk.iter().map(|n| (*n, "CMD [\"/bin/ryuk\"]")));
    for (name, cmd) in names {
        let o = docker(
            &["import", "--change", path, "--change", cmd, "-", name],
            Some(&tar),
        );
        assert!(o.status.success(), "import {name}: {}", err(&o));
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `docker run --rm -v docker.sock … docker:cli sh -c SCRIPT` in the job
/// behind `sock`.
fn in_cli(sock: &Path, extra: &[&str], script: &str) -> Output {
    let mut args = vec!["run", "--rm", "-v", SOCK];
    args.extend_from_slice(extra);
    args.extend(["docker:cli", "sh", "-c", script]);
    docker(sock, &args)
}

fn in_cli_ok(sock: &Path, extra: &[&str], script: &str) -> String {
    let o = in_cli(sock, extra, script);
    assert!(
        o.status.success(),
        "docker:cli {extra:?} {script:?}: {}{}",
        out(&o),
        err(&o)
    );
    out(&o)
}

fn daemon_id(sock: &Path) -> String {
    docker_ok(sock, &["info", "--format", "{{.ID}}"])
        .trim()
        .to_string()
}

/// Everything a job's containers do through docker:dind's socket, in two
/// jobs of `e`: each reaches its own daemon and nothing else.
fn the_socket_is_the_jobs_own_daemon(e: Engine) {
    let rt = rt();
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    let (sa, sb) = (a.socket(), b.socket());
    for s in [&sa, &sb] {
        import_busybox(s);
        import_cli_images(&|args, input| docker_stdin(s, args, input), &[]);
    }
    let (ida, idb) = (daemon_id(&sa), daemon_id(&sb));
    assert_ne!(ida, idb);
    let id_script = "docker info --format '{{.ID}}'";

    // Root in a container, plain and --privileged, at both of dind's paths.
    for (extra, path) in [
        (&[][..], "/var/run/docker.sock"),
        (&["--privileged"][..], "/run/docker.sock"),
    ] {
        let mut args = vec!["run", "--rm", "-v"];
        let bind = format!("{path}:/var/run/docker.sock");
        args.push(&bind);
        args.extend_from_slice(extra);
        args.extend(["docker:cli", "sh", "-c", id_script]);
        assert_eq!(docker_ok(&sa, &args).trim(), ida, "{path} {extra:?}");
    }
    assert_eq!(in_cli_ok(&sb, &[], id_script).trim(), idb);
    // The socket as a container sees it: dockerd's 0660, the docker group.
    assert_eq!(
        in_cli_ok(&sa, &[], "stat -c '%a %u %g' /var/run/docker.sock").trim(),
        format!("660 0 {DOCKER_GID}")
    );
    // A non-root user given the socket's group reaches it; without, not.
    let user = ["-u", "1000:1000", "--group-add", DOCKER_GID];
    assert_eq!(in_cli_ok(&sa, &user, id_script).trim(), ida);
    // (`docker ps`: `docker info` of some CLIs exits 0 without a server.)
    let o = in_cli(&sa, &user[..2], "docker ps -q");
    assert!(!o.status.success(), "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("permission denied"), "{}", err(&o));

    // docker:cli's uses: version, a sibling container, save (what image
    // scanners do), compose from inside a container.
    let server = docker_ok(&sa, &["version", "--format", "{{.Server.Version}}"]);
    assert_eq!(
        in_cli_ok(&sa, &[], "docker version --format '{{.Server.Version}}'"),
        server
    );
    assert_eq!(
        in_cli_ok(&sa, &[], "docker run --rm busybox:test echo sibling").trim(),
        "sibling"
    );
    let listing = in_cli_ok(&sa, &[], "docker save busybox:test | tar -t");
    assert!(
        listing.lines().any(|l| l == "manifest.json"),
        "docker save: {listing}"
    );
    let compose = "mkdir -p /p && cd /p && \
        printf 'services:\\n  web:\\n    image: busybox:test\\n    command: sleep 600\\n' \
        > compose.yaml && docker compose -p inner up -d";
    in_cli_ok(&sa, &[], compose);
    let project = ["ps", "--filter", "label=com.docker.compose.project=inner"];
    let names = |s: &Path| {
        let mut args = project.to_vec();
        args.extend(["--format", "{{.Names}} {{.State}}"]);
        docker_ok(s, &args)
    };
    assert_eq!(names(&sa).trim(), "inner-web-1 running");
    assert_eq!(names(&sb).trim(), "", "job B sees job A's project");
    in_cli_ok(&sa, &[], "docker compose -p inner down");
    assert_eq!(names(&sa).trim(), "");

    // The only sockets in the job's root are its own daemon's, its
    // containerd's and their shims' (in the job's own /run): no host
    // socket, no other job's.
    let host_sock = PathBuf::from(format!("/run/berth-host-{}.sock", a.id()));
    let _host = std::os::unix::net::UnixListener::bind(&host_sock).unwrap();
    let sockets = docker_ok(
        &sa,
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            "/:/host",
            "busybox:test",
            "sh",
            "-c",
            // Containers' own root filesystems (their /proc among them)
            // are theirs, not the job's view of the host.
            "find /host \\( -path /host/proc -o -path /host/sys \
             -o -path /host/var/lib/docker/overlay2 \\) -prune -o -type s -print \
             2>/dev/null; true",
        ],
    );
    let sockets: Vec<&str> = sockets.lines().collect();
    assert!(
        sockets.contains(&"/host/run/berth/docker.sock"),
        "{sockets:?}"
    );
    for s in &sockets {
        assert!(
            s.starts_with("/host/run/") || s.starts_with("/host/var/lib/berth/"),
            "a socket that is not the job's own: {s} (all: {sockets:?})"
        );
    }
    let _ = std::fs::remove_file(&host_sock);
    assert!(!sockets.iter().any(|s| s.contains("berth-host-")));
    // Nor can a container name one by its host path.
    let jobs_dir = e.config().state_dir.join("jobs");
    let other = jobs_dir.join(b.id()).join("api/docker.sock");
    assert!(other.exists(), "{} is missing", other.display());
    // dockerd makes the missing path in the job's own root: an empty
    // directory, not job B's socket.
    let seen = docker_ok(
        &sa,
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            &format!("{}:/other.sock", other.display()),
            "docker:cli",
            "sh",
            "-c",
            "[ -S /other.sock ] && echo socket; [ -d /other.sock ] && ls -A /other.sock; \
             docker -H unix:///other.sock info >/dev/null 2>&1 && echo answered; true",
        ],
    );
    assert_eq!(seen.trim(), "", "job A reached job B's socket");

    for sb in [a, b] {
        rt.block_on(e.teardown(sb.id())).unwrap();
    }
}

#[test]
fn a_jobs_containers_reach_its_daemon_at_docker_sock() {
    if !prerequisites() {
        return;
    }
    the_socket_is_the_jobs_own_daemon(engine(44, "inside-sock"));
}

#[test]
fn a_jobs_containers_reach_its_daemon_at_docker_sock_on_debian13s_engine() {
    if !prerequisites() {
        return;
    }
    let cfg = with_debian13_engine(engine_config(0, "inside-sock13"));
    the_socket_is_the_jobs_own_daemon(Engine::new(cfg).expect("engine"));
}

/// A Testcontainers client as a CI job's test run starts it.
enum Client {
    Python,
    Node,
}

impl Client {
    fn command(&self) -> Command {
        let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
        match self {
            Client::Python => {
                require_tools(&[(
                    &["python3", "-c", "import testcontainers.core.container"],
                    "testcontainers-python is missing: python3 -m pip install testcontainers==4.15.0",
                )]);
                let mut c = Command::new("python3");
                c.arg(clients.join("testcontainers_reaper.py"));
                c
            }
            Client::Node => {
                let dir = clients.join("node");
                assert!(
                    dir.join("node_modules/testcontainers").exists(),
                    "testcontainers-node is missing: npm ci --prefix tests/clients/node"
                );
                let mut c = Command::new("node");
                c.current_dir(&dir).arg("reaper.js");
                c
            }
        }
    }

    /// The reaper image the client asks for, from the client itself.
    fn reaper_image(&self) -> String {
        let o = self.command().arg("--reaper-image").output().unwrap();
        assert!(o.status.success(), "{}", err(&o));
        out(&o).trim().to_string()
    }
}

/// A test run with Testcontainers' defaults starts a container in a job and
/// is killed: the reaper it started (through the job's docker.sock)
/// removes the run's containers, then itself.
fn a_killed_test_runs_containers_are_reaped(n: u32, name: &str, client: Client) {
    // The agent at an address of its host other than loopback, as a CI
    // runner reaches it: with a loopback DOCKER_HOST, a client that finds
    // itself in a container (/.dockerenv) reaches published ports through
    // its gateway instead. The link comes first: the certificate names the
    // host's addresses when it is made.
    let _link = Outside::create(n as u8);
    let fd = FrontDoor::start_with(n, name, |c| {
        c.listen = format!("10.215.{n}.1:0").parse().unwrap();
    });
    let job = fd.create_job(&[]);
    let docker = |args: &[&str], input: Option<&[u8]>| docker_tls_stdin(&job, args, input);
    import_busybox_tls(&job);
    let reaper_image = client.reaper_image();
    // A stand-in, under the name the client asks for (tests/clients/ryuk).
    import_cli_images(&docker, &[&reaper_image]);

    let mut run = client
        .command()
        .arg("busybox:test")
        .env("DOCKER_HOST", &job.endpoint)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &job.dir)
        // requests would trust these bundles instead of DOCKER_CERT_PATH/ca.pem.
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env_remove("TESTCONTAINERS_RYUK_DISABLED")
        .env_remove("TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE")
        .env_remove("TESTCONTAINERS_HOST_OVERRIDE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut started = String::new();
    BufReader::new(run.stdout.take().unwrap())
        .read_line(&mut started)
        .unwrap();
    let Some(id) = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("container="))
        .map(str::to_string)
    else {
        let _ = run.kill();
        let o = run.wait_with_output().unwrap();
        panic!("the test run started nothing: {started}{}", err(&o));
    };
    let reapers = |all: bool| {
        let mut args = vec!["ps", "-q", "--filter", "name=testcontainers-ryuk-"];
        if all {
            args.push("-a");
        }
        docker_tls_ok(&job, &args)
    };
    let reaper = reapers(false).trim().to_string();
    assert_eq!(reaper.lines().count(), 1, "one reaper runs: {reaper:?}");
    let state = docker_tls_ok(
        &job,
        &[
            "inspect",
            "--format",
            "{{.State.Running}} {{.HostConfig.Binds}}",
            &reaper,
        ],
    );
    assert!(
        state.contains("true") && state.contains("/var/run/docker.sock:/var/run/docker.sock"),
        "{state}"
    );
    let running = docker_tls_ok(&job, &["inspect", "--format", "{{.State.Running}}", &id]);
    assert_eq!(running.trim(), "true");
    // The reaper answers at DOCKER_HOST's host, as the client reached it
    // (a label of its own: closing this connection reaps nothing).
    let port = docker_tls_ok(&job, &["port", &reaper, "8080/tcp"]);
    let port: u16 = port
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("reaper port: {port:?}"));
    let host = job.endpoint.trim_start_matches("tcp://");
    let host = &host[..host.rfind(':').unwrap()];
    let mut probe = std::net::TcpStream::connect((host, port)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    std::io::Write::write_all(&mut probe, b"label=berth.test.probe=1\r\n").unwrap();
    let mut ack = String::new();
    let _ = BufReader::new(&probe).read_line(&mut ack);
    assert_eq!(ack.trim(), "ACK", "reaper at {host}:{port}: {}", {
        let o = docker(&["logs", &reaper], None);
        format!("{}{}", out(&o), err(&o))
    });
    drop(probe);

    // The test run crashes: its connection to the reaper closes.
    run.kill().unwrap();
    let _ = run.wait();
    let gone = |what: &dyn Fn() -> String| {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if what().trim().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    };
    let logs = || {
        let o = docker(&["logs", &reaper], None);
        format!("{}{}", out(&o), err(&o))
    };
    assert!(
        gone(&|| docker_tls_ok(&job, &["ps", "-aq", "--filter", &format!("id={id}")])),
        "the killed run's container is still there; the reaper said: {}",
        logs()
    );
    assert!(
        gone(&|| reapers(true)),
        "the reaper is still there: {}",
        logs()
    );
    let o = fd.job_cli(&["rm", &job.id]);
    assert!(o.status.success(), "{}", err(&o));
}

#[test]
fn testcontainers_python_with_ryuk_reaps_a_killed_test_run() {
    if !prerequisites() {
        return;
    }
    a_killed_test_runs_containers_are_reaped(64, "inside-tc-py", Client::Python);
}

#[test]
fn testcontainers_node_with_ryuk_reaps_a_killed_test_run() {
    if !prerequisites() {
        return;
    }
    a_killed_test_runs_containers_are_reaped(65, "inside-tc-node", Client::Node);
}
