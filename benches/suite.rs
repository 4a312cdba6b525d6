//! berth's benchmark suite: one command, side by side in one run, a markdown
//! table at the end. Run as root: `cargo bench --bench suite` (scripts/bench-suite).
//! BERTH_BENCH_RUNS=N (default 10) sets the runs per latency figure.
//!
//! 1. Job ready latency, create → first `docker version` over mutual TLS
//!    succeeds: cold (no warm pool), warm pool, and the docker:dind way
//!    (its entrypoint's openssl RSA-4096 recipe, then dockerd with TLS).
//! 2. Proxy cost on one daemon: `docker save` of a 400 MB image and
//!    `GET /_ping` p50/p99 on a kept-alive connection, through berth, the
//!    job's unix socket, and dockerd's own TLS listener.
//! 3. Density: idle jobs added in steps (1, 10, 30, 100, 300, up to
//!    BERTH_BENCH_DENSITY, default 30): per job, RSS and PSS of its
//!    processes (PSS counts each shared page once, divided among its users)
//!    and what the host's MemAvailable lost, and the PSS by program; then,
//!    over 30 s with nothing
//!    asked of them, the CPU the jobs and the engine (this process) used;
//!    the engine's RSS; how many jobs answer `docker version`. The one-job
//!    step is the baseline of the ratios.
//! 4. Throughput: the small job (a cold start, busybox imported, a
//!    two-stage build, a run of it, the teardown) back to back, by one
//!    worker and by four at once (up to 10 jobs each), then by four at once
//!    whose jobs go without the host's emulators, then by four at once on
//!    Debian 13's engine: jobs per minute, the ratio to one worker, and the
//!    median time of each step.
//! 5. Preloaded 100 MB base image: new job to a container running from it,
//!    shared image store against loading the archive into every job, and
//!    a job without preloads as the floor.
//!
//! 6. Teardown: a job removed idle and with 3 running containers (one of
//!    them paused), against the same with a 3 s `stop_grace` (the opt-in
//!    graceful stop, the old default); and `berth run` of the hello
//!    pipeline: its wall time minus the sum of its steps, and that by part
//!    (agent start, job start, teardown, agent stop, the rest).
//! 7. The job's own disk (a loop-mounted sparse ext4): cold start → first
//!    docker CLI answer with and without it, alternating in one run.
//! 8. The shared pull-through cache: a fresh job's `docker pull` of a
//!    120 MB Docker Hub name whose upstream (a registry in a test host's
//!    namespace) sits behind a 200 Mbit/s link, through an empty cache, a
//!    warm one, and with the upstream as the job's only mirror (no cache).
//!
//! 9. BuildKit on each engine (Debian 12's dockerd 20.10, Debian 13's 26.1
//!    from /opt): a multi-stage build (`--no-cache`) through the front door
//!    against the job's unix socket, alternating; the same Dockerfile with
//!    the legacy builder; and a step whose `--mount=type=cache` is cold
//!    (after `builder prune`) against the same step warm.
//!
//! 10. Workspaces: job ready through the front door with a workspace
//!     against without one, cold and from the warm pool, alternating; a 500 MB file written (fsync'd)
//!     by a container in a job through its workspace against the same
//!     busybox `dd` on the host in the same directory, alternating; then
//!     one such file read by both from a cold page cache, alternating.
//!     Each timed where it runs, by one static binary
//!     (tests/clients/timed_io.c, built with gcc at the start).
//!
//! - emulation: the build section's multi-stage Dockerfile for linux/arm64
//!   under the host's emulation (qemu-user-static, the job's own
//!   binfmt_misc) against the same build for amd64, alternating, per engine.
//!
//! 11. The image store on Debian 13's engine: a new job's start → first
//!     docker CLI answer with the containerd image store against the
//!     classic one, alternating; memory (RSS and PSS) and data-root of 5
//!     idle jobs of each.
//!
//! 12. Project caches (docs/caches.md), through the front door: a
//!     multi-stage BuildKit build of Lua 5.4 (a debootstrap'd bookworm
//!     base from a registry, gcc and make from an apt repository, both in
//!     a test host; apt's lists and downloads in cache mounts) in a fresh
//!     job without a key against a job whose key holds the previous run,
//!     with the same source and after a one-line change, alternating; job
//!     ready with an empty key against a 5 GiB one (and no key), cold; the
//!     pool's used space (statfs) with 4 jobs of the 5 GiB key running,
//!     each having written 100 MiB, against 4 × the key. Setup
//!     (benches/support/project-cache-setup) downloads once, under
//!     /var/lib/bt/bs-pc-setup.
//!
//! 13. The front door under load: 200 bollard clients across 20 jobs
//!     (`_ping`, `logs -f`, `events`, `exec` with stdin) for
//!     BERTH_BENCH_LOAD_SECS (300 by default): `_ping` p50 and p99
//!     against one client pinging alone before, clients dropped, the
//!     agent's memory, descriptors and CPU (benches/support/load.rs).
//!
//! 14. The Go runtime's knobs for the engine (dockerd, and the containerd
//!     and shims it starts, which inherit its environment): the default
//!     against GOGC=50, GOGC=25 and GOMEMLIMIT=32MiB, each set by a
//!     wrapper that execs Debian's dockerd. Per setting: PSS per idle job
//!     by program with 10 idle jobs, their CPU over 30 s; then the small
//!     job (throughput's) back to back, the settings alternating, the
//!     median of its start and build steps against the default's.
//!
//! BERTH_BENCH_ONLY=ready,proxy,density,throughput,preload,teardown,disk,cache,build,workspace,emulation,image-store,project-cache,load,go-runtime
//! runs a subset.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;
#[path = "support/stats.rs"]
mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use stats::{median, pct, runs};

fn section(name: &str) -> bool {
    std::env::var("BERTH_BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == name))
        .unwrap_or(true)
}

/// New job → the image is usable (one docker CLI round trip finds it; the
/// floor without an image does the same round trip with `docker version`).
/// Each job then runs a container from the image, untimed, as a check.
fn start_to_usable(
    e: &berth::sandbox::Engine,
    rt: &tokio::runtime::Runtime,
    image: Option<&str>,
) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..runs() {
        let t = Instant::now();
        let sb = rt.block_on(e.start(None)).unwrap();
        match image {
            Some(img) => {
                common::docker_ok(&sb.socket(), &["image", "inspect", "-f", "{{.Id}}", img])
            }
            None => common::docker_ok(&sb.socket(), &["version", "-f", "{{.Server.Version}}"]),
        };
        out.push(ms(t.elapsed()));
        if let Some(img) = image {
            common::docker_ok(&sb.socket(), &["run", "--rm", img, "true"]);
        }
        rt.block_on(e.teardown(sb.id())).unwrap();
    }
    out
}

/// One start → first `docker version` answer, then teardown.
fn start_to_usable_once(e: &berth::sandbox::Engine, rt: &tokio::runtime::Runtime) -> Vec<f64> {
    let t = Instant::now();
    let sb = rt.block_on(e.start(None)).unwrap();
    common::docker_ok(&sb.socket(), &["version", "-f", "{{.Server.Version}}"]);
    let took = ms(t.elapsed());
    rt.block_on(e.teardown(sb.id())).unwrap();
    vec![took]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `docker version` with these variables until it succeeds.
fn until_version(env: &[(&str, String)], deadline: Duration) {
    let t = Instant::now();
    loop {
        let ok = Command::new("docker")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            t.elapsed() < deadline,
            "no docker version within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Create → first successful `docker version` through a front door, with
/// the docker CLI (`cli`) or an in-process client (GET /version over mTLS).
fn ready_latency(
    fd: &common::FrontDoor,
    rt: &tokio::runtime::Runtime,
    warm: bool,
    cli: bool,
) -> Vec<f64> {
    ready_latency_of(fd, rt, warm, cli, &serde_json::json!({}), runs())
}

/// Job ready latency for jobs created with `spec`, `n` times.
fn ready_latency_of(
    fd: &common::FrontDoor,
    rt: &tokio::runtime::Runtime,
    warm: bool,
    cli: bool,
    spec: &serde_json::Value,
    n: usize,
) -> Vec<f64> {
    let client = berth::client::AgentClient::new(&fd.endpoint(), &fd.certs).unwrap();
    let state = PathBuf::from(format!(
        "/var/lib/bt/{}/jobs",
        fd.certs
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches("-certs")
    ));
    let mut out = Vec::new();
    for i in 0..n {
        if warm {
            // Let the pool refill: a warm sandbox must be waiting.
            let t = Instant::now();
            loop {
                let ready = std::fs::read_dir(&state)
                    .map(|r| {
                        r.flatten()
                            .filter(|e| {
                                rt.block_on(berth::sandbox::ping(&e.path().join("api/docker.sock")))
                            })
                            .count()
                    })
                    .unwrap_or(0);
                if ready >= 1 {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "pool never refilled");
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let dir = fd.certs.join(format!("ready-{i}"));
        let t = Instant::now();
        let created = rt.block_on(client.create(spec)).unwrap();
        berth::pki::Bundle {
            ca_pem: created.ca,
            cert_pem: created.cert,
            key_pem: created.key,
        }
        .write_to(&dir)
        .unwrap();
        if cli {
            until_version(
                &[
                    ("DOCKER_HOST", created.endpoint.clone()),
                    ("DOCKER_TLS_VERIFY", "1".into()),
                    ("DOCKER_CERT_PATH", dir.display().to_string()),
                ],
                Duration::from_secs(60),
            );
        } else {
            rt.block_on(async {
                let io = tls_to(&fd.endpoint(), &dir, "localhost").await;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let req = hyper::Request::get("/version")
                    .header("host", "docker")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let r = sender.send_request(req).await.unwrap();
                assert!(r.status().is_success());
                let _ = r.into_body().collect().await.unwrap();
            });
        }
        out.push(ms(t.elapsed()));
        rt.block_on(client.delete(&created.id)).unwrap();
    }
    out
}

/// The docker:dind way: its entrypoint's openssl recipe (RSA-4096 CA, server
/// and client keys), then dockerd with --tlsverify, until `docker version`.
fn dind_latency() -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..runs() {
        let dir = PathBuf::from(format!("/var/lib/bt/bench-dind/{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = 23760 + i as u16;
        let t = Instant::now();
        let sh = |cmd: &str| {
            let st = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "{cmd}");
        };
        sh(
            "openssl genrsa -out ca-key.pem 4096 && openssl req -new -key ca-key.pem -out ca.pem -x509 -days 825 -subj '/CN=docker:dind CA'",
        );
        sh(
            "openssl genrsa -out server-key.pem 4096 && openssl req -new -key server-key.pem -out server.csr -subj '/CN=docker:dind server' \
            && printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\\nextendedKeyUsage = serverAuth\\n' > server.ext \
            && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out server.pem -days 825 -extfile server.ext",
        );
        sh(
            "openssl genrsa -out key.pem 4096 && openssl req -new -key key.pem -out client.csr -subj '/CN=docker:dind client' \
            && printf 'extendedKeyUsage = clientAuth\\n' > client.ext \
            && openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out cert.pem -days 825 -extfile client.ext",
        );
        let mut d = Command::new("/usr/sbin/dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(format!("/run/bt-dind-{i}"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["--host", &format!("tcp://127.0.0.1:{port}"), "--tlsverify"])
            .arg("--tlscacert")
            .arg(dir.join("ca.pem"))
            .arg("--tlscert")
            .arg(dir.join("server.pem"))
            .arg("--tlskey")
            .arg(dir.join("server-key.pem"))
            // Leave the host's network alone (dind has a netns of its own).
            .args(["--bridge", "none", "--iptables=false", "--ip-forward=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_version(
            &[
                ("DOCKER_HOST", format!("tcp://127.0.0.1:{port}")),
                ("DOCKER_TLS_VERIFY", "1".into()),
                ("DOCKER_CERT_PATH", dir.display().to_string()),
            ],
            Duration::from_secs(120),
        );
        out.push(ms(t.elapsed()));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let _ = d.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(format!("/run/bt-dind-{i}"));
    }
    out
}

async fn ping_latencies<IO>(io: IO, n: usize) -> Vec<f64>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let req = hyper::Request::get("/_ping")
            .header("host", "docker")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let t = Instant::now();
        let r = sender.send_request(req).await.unwrap();
        let _ = r.into_body().collect().await.unwrap();
        if i >= 50 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    out
}

async fn tls_to(
    addr: &str,
    dir: &Path,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

fn time_save(env: &[(&str, String)]) -> f64 {
    stats::time_docker(env, &["save", "big:1"])
}

fn main() {
    if !common::prerequisites() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = common::rt();
    let n = runs();
    let mut table = Vec::new();
    // 1. Ready latency.
    if section("ready") {
        let (cold, cold_lib) = {
            let fd = common::FrontDoor::start_with(50, "bs-cold", |c| c.warm_pool = 0);
            (
                ready_latency(&fd, &rt, false, true),
                ready_latency(&fd, &rt, false, false),
            )
        };
        let (warm, warm_lib) = {
            let fd = common::FrontDoor::start_with(51, "bs-warm", |c| c.warm_pool = 1);
            (
                ready_latency(&fd, &rt, true, true),
                ready_latency(&fd, &rt, true, false),
            )
        };
        let dind = dind_latency();
        row(
            &mut table,
            format!(
                "| job ready, cold, docker CLI (ms) | {:.0} | {:.0} |",
                median(&cold),
                pct(&cold, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| job ready, cold, in-process client (ms) | {:.0} | {:.0} |",
                median(&cold_lib),
                pct(&cold_lib, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| job ready, warm pool, docker CLI (ms) | {:.1} | {:.1} |",
                median(&warm),
                pct(&warm, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| job ready, warm pool, in-process client (ms) | {:.1} | {:.1} |",
                median(&warm_lib),
                pct(&warm_lib, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| job ready, docker:dind way: openssl RSA-4096 ×3 + dockerd (ms) | {:.0} | {:.0} |",
                median(&dind),
                pct(&dind, 0.95)
            ),
        );
    }

    // 2. Proxy cost on one daemon, with dockerd's own TLS listener beside berth.
    if section("proxy") {
        let tls_dir = PathBuf::from("/var/lib/bt/bench-daemon-tls");
        let _ = std::fs::remove_dir_all(&tls_dir);
        let ca = berth::pki::Ca::load_or_create(&tls_dir).unwrap();
        let mut cfgprobe = common::engine_config(52, "bs-proxy");
        let job_ips: Vec<String> = (0..8)
            .map(|s| cfgprobe.link_addrs(s).1.to_string())
            .collect();
        let server = ca.issue_server(&job_ips).unwrap();
        let client = ca
            .issue_client(
                &berth::pki::Identity::Admin,
                time::OffsetDateTime::now_utc() + Duration::from_secs(86400),
            )
            .unwrap();
        let daemon_dir = tls_dir.join("daemon");
        server.write_to(&daemon_dir).unwrap();
        client.write_to(&tls_dir.join("client")).unwrap();
        // The job's root must read its listener's key: give it the whole range's first id.
        std::os::unix::fs::chown(
            &daemon_dir,
            Some(cfgprobe.uid_base),
            Some(cfgprobe.uid_base),
        )
        .unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::os::unix::fs::chown(
                daemon_dir.join(f),
                Some(cfgprobe.uid_base),
                Some(cfgprobe.uid_base),
            )
            .unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tls_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        cfgprobe.unchecked_dockerd_args = vec![
            "--host".into(),
            "tcp://0.0.0.0:2377".into(),
            "--tlsverify".into(),
            "--tlscacert".into(),
            daemon_dir.join("ca.pem").display().to_string(),
            "--tlscert".into(),
            daemon_dir.join("cert.pem").display().to_string(),
            "--tlskey".into(),
            daemon_dir.join("key.pem").display().to_string(),
        ];
        {
            let engine = std::sync::Arc::new(berth::sandbox::Engine::new(cfgprobe).unwrap());
            let fd = common::FrontDoor::start_engine(engine, "bs-proxy", |c| c.warm_pool = 0);
            let job = fd.create_job(&["--ttl", "2h"]);
            let sock = format!("/var/lib/bt/bs-proxy/jobs/{}/api/docker.sock", job.id);
            let job_ip = std::fs::read_to_string(format!(
                "/var/lib/bt/bs-proxy/jobs/{}/record.json",
                job.id
            ))
            .unwrap();
            let job_ip = serde_json::from_str::<serde_json::Value>(&job_ip).unwrap()["job_ip"]
                .as_str()
                .unwrap()
                .to_string();
            let via_berth = vec![
                ("DOCKER_HOST", job.endpoint.clone()),
                ("DOCKER_TLS_VERIFY", "1".into()),
                ("DOCKER_CERT_PATH", job.dir.display().to_string()),
            ];
            let via_unix = vec![("DOCKER_HOST", format!("unix://{sock}"))];
            let via_daemon_tls = vec![
                ("DOCKER_HOST", format!("tcp://{job_ip}:2377")),
                ("DOCKER_TLS_VERIFY", "1".into()),
                (
                    "DOCKER_CERT_PATH",
                    tls_dir.join("client").display().to_string(),
                ),
            ];
            until_version(&via_daemon_tls, Duration::from_secs(30));
            common::build_big_image(&job, &fd.certs.join("big"));
            let (mut sb, mut su, mut sd) = (vec![], vec![], vec![]);
            for i in 0..n {
                // Rotate the order so drift hits every path alike.
                for k in 0..3 {
                    match (i + k) % 3 {
                        0 => sb.push(time_save(&via_berth)),
                        1 => su.push(time_save(&via_unix)),
                        _ => sd.push(time_save(&via_daemon_tls)),
                    }
                }
            }
            let (mb, mu, md) = (median(&sb), median(&su), median(&sd));
            row(
                &mut table,
                format!(
                    "| `docker save` 400 MB: berth / unix socket / dockerd TLS (s) | {mb:.2} / {mu:.2} / {md:.2} | ratios to unix {:.3} / 1 / {:.3} |",
                    mb / mu,
                    md / mu
                ),
            );
            let (pb, pu, pd) = rt.block_on(async {
                let pb =
                    ping_latencies(tls_to(&fd.endpoint(), &job.dir, "localhost").await, 2000).await;
                let pu =
                    ping_latencies(tokio::net::UnixStream::connect(&sock).await.unwrap(), 2000)
                        .await;
                let pd = ping_latencies(
                    tls_to(&format!("{job_ip}:2377"), &tls_dir.join("client"), &job_ip).await,
                    2000,
                )
                .await;
                (pb, pu, pd)
            });
            row(
                &mut table,
                format!(
                    "| `GET /_ping` kept alive, p50 (µs): berth / unix socket / dockerd TLS | {:.0} / {:.0} / {:.0} | p99 {:.0} / {:.0} / {:.0} |",
                    median(&pb),
                    median(&pu),
                    median(&pd),
                    pct(&pb, 0.99),
                    pct(&pu, 0.99),
                    pct(&pd, 0.99)
                ),
            );
        }
    }
    // 3. Density.
    if section("density") {
        density_figures(&rt, &mut table);
    }

    // 4. Throughput: the small job back to back, one worker against four.
    if section("throughput") {
        let d12 = common::engine(54, "bs-throughput");
        // Debian 13's engine, whose builder searches for platforms a third
        // as often per build.
        let d13 = berth::sandbox::Engine::new(common::with_debian13_engine(common::engine_config(
            59,
            "bs-throughput-d13",
        )))
        .expect("engine");
        let per_worker = n.clamp(2, 10);
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let mut one = None;
        // The third round's jobs go without the host's emulators: the
        // engine's builder then starts none of them to list its platforms.
        for (workers, emulation, e, engine) in [
            (1usize, None, &d12, ""),
            (4, None, &d12, ""),
            (4, Some(false), &d12, ""),
            (4, None, &d13, ", dockerd 26.1"),
        ] {
            let t = Instant::now();
            let busy0 = load::host_ticks();
            let jobs: Vec<[f64; 6]> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..workers)
                    .map(|_| {
                        s.spawn(|| {
                            (0..per_worker)
                                .map(|_| small_job(e, &rt, emulation))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            let wall = t.elapsed().as_secs_f64();
            // Everything the machine ran meanwhile (the jobs, the clients,
            // the agent, the kernel's threads), in clock ticks of 100 a second.
            let busy = (load::host_ticks() - busy0) as f64 / 100.0 / jobs.len() as f64;
            let used = 100.0 * busy * jobs.len() as f64 / (wall * cores as f64);
            let rate = jobs.len() as f64 * 60.0 / wall;
            let one = *one.get_or_insert(rate);
            let parts = ["start", "import", "build", "run", "teardown"]
                .iter()
                .enumerate()
                .map(|(k, step)| {
                    let v: Vec<f64> = jobs.iter().map(|j| j[k]).collect();
                    format!("{step} {:.2}", median(&v))
                })
                .collect::<Vec<_>>()
                .join(", ");
            // The rate the cores would carry if the jobs' own processes
            // (not the clients, not the kernel's threads) were all they ran.
            let cpu = median(&jobs.iter().map(|j| j[5]).collect::<Vec<_>>());
            let ceiling = cores as f64 * 60.0 / cpu;
            row(
                &mut table,
                format!(
                    "| throughput, {workers} worker(s), {} small jobs back to back{}{engine} (jobs/min) | {rate:.1} | {:.2}× one worker; median s per step: {parts}; CPU per job {cpu:.2} s (its cgroups), {ceiling:.0} jobs/min on {cores} cores at that CPU alone ({:.0} % of it reached); the machine's busy CPU per job {busy:.2} s, the cores {used:.0} % busy |",
                    jobs.len(),
                    if emulation == Some(false) {
                        ", without emulation"
                    } else {
                        ""
                    },
                    rate / one,
                    100.0 * rate / ceiling
                ),
            );
        }
    }

    // 5. A preloaded 100 MB base image: shared store vs loading per job.
    if section("preload") {
        let archive = PathBuf::from("/var/lib/bt/bench-preload-100m.tar");
        {
            let e = common::engine(55, "bs-preload-src");
            let sb = rt.block_on(e.start(None)).unwrap();
            common::import_busybox(&sb.socket());
            let ctx = PathBuf::from("/var/lib/bt/bench-preload-ctx");
            std::fs::create_dir_all(&ctx).unwrap();
            std::fs::write(
                ctx.join("Dockerfile"),
                "FROM busybox:test\nRUN head -c 100000000 /dev/urandom > /big\n",
            )
            .unwrap();
            common::docker_ok(
                &sb.socket(),
                &["build", "-q", "-t", "base100:1", ctx.to_str().unwrap()],
            );
            let out = common::docker(&sb.socket(), &["save", "base100:1"]);
            assert!(out.status.success());
            std::fs::write(&archive, &out.stdout).unwrap();
            rt.block_on(e.teardown(sb.id())).unwrap();
        }
        let engine_with = |n: u32, name: &str, share: bool, preload: bool| {
            let mut c = common::engine_config(n, name);
            if preload {
                c.preload = vec![archive.clone()];
            }
            c.share_preloads = share;
            berth::sandbox::Engine::new(c).unwrap()
        };
        let plain = engine_with(56, "bs-preload-none", true, false);
        let floor = start_to_usable(&plain, &rt, None);
        drop(plain);
        let shared = engine_with(57, "bs-preload-shared", true, true);
        // The first start builds the shared store; time it on its own.
        let t = Instant::now();
        let first = rt.block_on(shared.start(None)).unwrap();
        let seed_ms = ms(t.elapsed());
        rt.block_on(shared.teardown(first.id())).unwrap();
        let with_shared = start_to_usable(&shared, &rt, Some("base100:1"));
        drop(shared);
        let loading = engine_with(58, "bs-preload-load", false, true);
        let with_load = start_to_usable(&loading, &rt, Some("base100:1"));
        row(
            &mut table,
            format!(
                "| new job, no preload: start → first docker CLI answer (ms) | {:.0} | {:.0} |",
                median(&floor),
                pct(&floor, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| new job with a preloaded 100 MB image, shared store: start → image usable (ms) | {:.0} | {:.0} (+{:.0} over no preload) |",
                median(&with_shared),
                pct(&with_shared, 0.95),
                median(&with_shared) - median(&floor)
            ),
        );
        row(
            &mut table,
            format!(
                "| same, loading the archive into every job (ms) | {:.0} | {:.0} (+{:.0} over no preload) |",
                median(&with_load),
                pct(&with_load, 0.95),
                median(&with_load) - median(&floor)
            ),
        );
        row(
            &mut table,
            format!("| building the shared store once, at the first job (ms) | {seed_ms:.0} | |"),
        );
    }

    // 6. Teardown.
    if section("teardown") {
        let quick = common::engine(63, "bs-teardown");
        let idle = teardown_times(&quick, &rt, 0, n);
        let busy = teardown_times(&quick, &rt, 3, n);
        drop(quick);
        let graceful = berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
            stop_grace: Duration::from_secs(3),
            ..common::engine_config(63, "bs-teardown-grace")
        })
        .unwrap();
        let grace_runs = n.clamp(1, 5);
        let with_grace = teardown_times(&graceful, &rt, 3, grace_runs);
        drop(graceful);
        let hello: Vec<Vec<f64>> = (0..n.clamp(1, 5)).map(|_| hello_overhead(None)).collect();
        let served = hello_served(n.clamp(1, 5));
        row(
            &mut table,
            format!(
                "| teardown, idle job (ms) | {:.0} | {:.0} |",
                median(&idle),
                pct(&idle, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| teardown, 3 running containers, one paused (ms) | {:.0} | {:.0} |",
                median(&busy),
                pct(&busy, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| same with stop_grace = 3 s (opt-in graceful stop), {grace_runs} runs (ms) | {:.0} | {:.2}× the default |",
                median(&with_grace),
                median(&with_grace) / median(&busy)
            ),
        );
        hello_row(
            &mut table,
            "hello pipeline: wall time minus its steps",
            &hello,
        );
        hello_row(
            &mut table,
            "same, `--endpoint` to a served agent with a warm pool of one",
            &served,
        );
    }

    // 7. The job's own disk against none, alternating.
    if section("disk") {
        let with = common::engine(63, "bs-disk");
        let without = berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
            default_limits: berth::sandbox::Limits {
                disk_bytes: Some(0),
                ..berth::sandbox::SandboxConfig::default().default_limits
            },
            ..common::engine_config(62, "bs-nodisk")
        })
        .unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..n {
            a.extend(start_to_usable_once(&with, &rt));
            b.extend(start_to_usable_once(&without, &rt));
        }
        row(
            &mut table,
            format!(
                "| new job with its own 20 GiB disk: start → first docker CLI answer (ms) | {:.0} | {:.0} ({:+.0} / {:.2}× against no disk: {:.0}) |",
                median(&a),
                pct(&a, 0.95),
                median(&a) - median(&b),
                median(&a) / median(&b),
                median(&b)
            ),
        );
    }

    // 11. The image store on Debian 13's engine: classic against containerd.
    if section("image-store") {
        for r in image_store_figures(&rt, n) {
            row(&mut table, r);
        }
    }

    // 10. Workspaces.
    if section("workspace") {
        workspace_figures(&rt, n, &mut table);
    }

    // 8. The pull-through cache: cold, warm, and none.
    if section("cache") {
        let (cold, warm, direct, upstream_blobs) = cache_pulls(&rt, n.clamp(1, 5));
        row(
            &mut table,
            format!(
                "| fresh job pulls a 120 MB image, upstream at 200 Mbit/s, no cache (s) | {:.2} | {:.2} |",
                median(&direct),
                pct(&direct, 0.95)
            ),
        );
        row(
            &mut table,
            format!(
                "| same through an empty cache (s) | {:.2} | {:.2}× no cache |",
                median(&cold),
                median(&cold) / median(&direct)
            ),
        );
        row(
            &mut table,
            format!(
                "| same through a warm cache (s) | {:.2} | {:.2}× no cache; upstream blob downloads during warm pulls: {upstream_blobs} |",
                median(&warm),
                median(&warm) / median(&direct)
            ),
        );
    }

    // 12. Project caches.
    if section("project-cache") {
        project_cache_figures(&rt, n, &mut table);
    }
    // 13. The front door under load.
    if section("load") {
        load::figures(&mut table);
    }
    // 14. The Go runtime's knobs for the engine.
    if section("go-runtime") {
        go_runtime_figures(&rt, n, &mut table);
    }

    // 9. BuildKit builds on each engine.
    if section("build") || section("emulation") {
        for (label, cfg) in [
            ("dockerd 20.10", common::engine_config(47, "bs-build-d12")),
            (
                "dockerd 26.1",
                common::with_debian13_engine(common::engine_config(48, "bs-build-d13")),
            ),
        ] {
            for r in build_figures(label, cfg, n) {
                row(&mut table, r);
            }
        }
    }

    println!(
        "## berth benchmark suite — {n} runs per latency, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!("| figure | median | p95 / other |");
    println!("|---|---|---|");
    for r in table {
        println!("{r}");
    }
}

/// Variables for the docker CLI.
type Env<'a> = &'a [(&'a str, String)];

/// A timed docker CLI run: its variables, arguments and standard input.
type TimedDocker<'a> = &'a dyn Fn(Env, &[&str], Option<&[u8]>) -> f64;

/// Rows for one engine: BuildKit through the front door against the unix
/// socket, against the legacy builder, and a cache mount cold against warm.
fn build_figures(label: &str, cfg: berth::sandbox::SandboxConfig, n: usize) -> Vec<String> {
    let name = cfg
        .state_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let state = cfg.state_dir.clone();
    let engine = std::sync::Arc::new(berth::sandbox::Engine::new(cfg).unwrap());
    let fd = common::FrontDoor::start_engine(engine, &name, |c| c.warm_pool = 0);
    let job = fd.create_job(&["--ttl", "2h"]);
    let sock = state.join("jobs").join(&job.id).join("api/docker.sock");
    let work = PathBuf::from(format!("/var/lib/bt/{name}-work"));
    let _ = std::fs::remove_dir_all(&work);
    let (multi, cached) = (work.join("multi"), work.join("cached"));
    std::fs::create_dir_all(&multi).unwrap();
    std::fs::create_dir_all(&cached).unwrap();
    std::fs::write(
        multi.join("Dockerfile"),
        "FROM busybox:test AS gen\n\
         RUN dd if=/dev/urandom of=/blob bs=1M count=32 2>/dev/null && sha256sum /blob > /blob.sha\n\
         FROM busybox:test AS check\n\
         COPY --from=gen /blob /blob\n\
         RUN sha256sum /blob > /check\n\
         FROM busybox:test\n\
         COPY --from=gen /blob.sha /\n\
         COPY --from=check /blob /check /data/\n",
    )
    .unwrap();
    // What a dependency download is to a real build: work the cache mount
    // keeps for the next build of the job.
    std::fs::write(
        cached.join("Dockerfile"),
        "FROM busybox:test\n\
         ARG ROUND\n\
         RUN --mount=type=cache,target=/deps sh -c '[ -f /deps/done ] || { dd if=/dev/urandom of=/deps/blob bs=1M count=128 2>/dev/null && sha256sum /deps/blob > /deps/sum && touch /deps/done; }; cp /deps/sum /sum'\n",
    )
    .unwrap();
    let config = work.join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let tls = [
        ("DOCKER_HOST", job.endpoint.clone()),
        ("DOCKER_TLS_VERIFY", "1".to_string()),
        ("DOCKER_CERT_PATH", job.dir.display().to_string()),
    ];
    let unix = [("DOCKER_HOST", format!("unix://{}", sock.display()))];
    let docker = |env: &[(&str, String)], args: &[&str], input: Option<&[u8]>| {
        let mut c = Command::new("docker");
        c.env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_BUILDKIT")
            .env("DOCKER_CONFIG", &config)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t = Instant::now();
        let mut child = c.spawn().unwrap();
        if let Some(bytes) = input {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bytes).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed().as_secs_f64()
    };
    docker(
        &tls,
        &["import", "--change", "ENV PATH=/bin", "-", "busybox:test"],
        Some(common::busybox_tar()),
    );
    let m = multi.to_str().unwrap();
    let build = ["build", "--no-cache", "-q", "-t", "multi:1", m];
    if !section("build") {
        let rows = emulation_figures(&docker, &tls, &work, m, n);
        assert!(fd.job_cli(&["rm", &job.id]).status.success());
        return rows
            .into_iter()
            .map(|r| format!("| {label}: {r}"))
            .collect();
    }
    let (mut via_tls, mut via_unix, mut legacy) = (Vec::new(), Vec::new(), Vec::new());
    // One untimed build of each kind first: the first BuildKit build of a
    // daemon sets up its state.
    docker(&tls, &build, None);
    docker(&unix, &build, None);
    let mut legacy_env = tls.to_vec();
    legacy_env.push(("DOCKER_BUILDKIT", "0".into()));
    // Each round in another order, so that what one build leaves behind
    // (an image to untag, cache to collect) weighs on each path alike.
    for i in 0..n {
        let mut round: [(Env, &mut Vec<f64>); 3] = [
            (&tls, &mut via_tls),
            (&unix, &mut via_unix),
            (&legacy_env, &mut legacy),
        ];
        round.rotate_left(i % 3);
        for (env, out) in round {
            out.push(docker(env, &build, None));
        }
    }
    let c = cached.to_str().unwrap();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..n {
        docker(&tls, &["builder", "prune", "-af"], None);
        let (a, b) = (format!("ROUND=c{i}"), format!("ROUND=w{i}"));
        cold.push(docker(
            &tls,
            &["build", "-q", "-t", "c:1", "--build-arg", &a, c],
            None,
        ));
        warm.push(docker(
            &tls,
            &["build", "-q", "-t", "c:1", "--build-arg", &b, c],
            None,
        ));
    }
    let emulated = if section("emulation") {
        emulation_figures(&docker, &tls, &work, m, n)
    } else {
        Vec::new()
    };
    assert!(fd.job_cli(&["rm", &job.id]).status.success());
    let mut rows = vec![
        format!(
            "| {label}: multi-stage BuildKit build --no-cache, front door (s) | {:.2} | {:.3}× the job's unix socket ({:.2}) |",
            median(&via_tls),
            median(&via_tls) / median(&via_unix),
            median(&via_unix)
        ),
        format!(
            "| {label}: same Dockerfile, legacy builder, front door (s) | {:.2} | BuildKit {:.2}× the legacy builder |",
            median(&legacy),
            median(&via_tls) / median(&legacy)
        ),
        format!(
            "| {label}: step with a warm --mount=type=cache (s) | {:.2} | {:.2}× the same step cold ({:.2}) |",
            median(&warm),
            median(&warm) / median(&cold),
            median(&cold)
        ),
    ];
    rows.extend(emulated.into_iter().map(|r| format!("| {label}: {r}")));
    rows
}

/// The multi-stage Dockerfile of `multi` built for arm64 under the host's
/// emulation (from the arm64 busybox image) against the same build for
/// amd64, alternating, through the front door: a row without its label.
fn emulation_figures(
    docker: TimedDocker<'_>,
    tls: Env,
    work: &Path,
    multi: &str,
    n: usize,
) -> Vec<String> {
    docker(tls, &["load"], Some(&common::arm64_busybox_tar()));
    let arm64 = work.join("multi-arm64");
    std::fs::create_dir_all(&arm64).unwrap();
    let text = std::fs::read_to_string(Path::new(multi).join("Dockerfile")).unwrap();
    std::fs::write(
        arm64.join("Dockerfile"),
        text.replace(
            "FROM busybox:test",
            &format!("FROM {}", common::ARM64_IMAGE),
        ),
    )
    .unwrap();
    let a = arm64.to_str().unwrap();
    let native = ["build", "--no-cache", "-q", "-t", "multi:amd64", multi];
    let foreign = [
        "build",
        "--no-cache",
        "-q",
        "--platform",
        "linux/arm64",
        "-t",
        "multi:arm64",
        a,
    ];
    docker(tls, &foreign, None);
    let (mut on_amd64, mut on_arm64) = (Vec::new(), Vec::new());
    for i in 0..n {
        if i % 2 == 0 {
            on_amd64.push(docker(tls, &native, None));
            on_arm64.push(docker(tls, &foreign, None));
        } else {
            on_arm64.push(docker(tls, &foreign, None));
            on_amd64.push(docker(tls, &native, None));
        }
    }
    vec![format!(
        "same Dockerfile for linux/arm64 under emulation (s) | {:.2} | {:.2}× amd64 ({:.2}) |",
        median(&on_arm64),
        median(&on_arm64) / median(&on_amd64),
        median(&on_amd64)
    )]
}

/// What the containerd image store costs a job on Debian 13's engine,
/// against the classic store in the same run: cold start → first docker
/// CLI answer (alternating), then memory and disk of 5 idle jobs of each
/// (after 5 s), every job answering.
fn image_store_figures(rt: &tokio::runtime::Runtime, n: usize) -> Vec<String> {
    use berth::sandbox::{Engine, ImageStore, SandboxConfig};
    let engine = |store, n, name| {
        Engine::new(SandboxConfig {
            image_store: store,
            ..common::with_debian13_engine(common::engine_config(n, name))
        })
        .unwrap()
    };
    let classic = engine(ImageStore::Classic, 76, "bs-store-classic");
    let containerd = engine(ImageStore::Containerd, 77, "bs-store-containerd");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..n {
        if i % 2 == 0 {
            a.extend(start_to_usable_once(&classic, rt));
            b.extend(start_to_usable_once(&containerd, rt));
        } else {
            b.extend(start_to_usable_once(&containerd, rt));
            a.extend(start_to_usable_once(&classic, rt));
        }
    }
    let idle = |e: &Engine| {
        let jobs: Vec<_> = (0..5)
            .map(|_| rt.block_on(e.start(None)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_secs(5));
        for j in &jobs {
            let driver = common::docker_ok(&j.socket(), &["info", "-f", "{{json .DriverStatus}}"]);
            assert_eq!(
                driver.contains("io.containerd.snapshotter"),
                e.config().image_store == ImageStore::Containerd,
                "{driver}"
            );
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64 / jobs.len() as f64;
        let rss = mib(jobs.iter().map(|j| j.rss_bytes()).sum());
        let pss = mib(jobs.iter().flat_map(|j| j.pids()).map(pss_of).sum());
        let disk = mib(jobs
            .iter()
            .map(|j| {
                du_bytes(
                    &e.config()
                        .state_dir
                        .join("jobs")
                        .join(j.id())
                        .join("root/data"),
                )
            })
            .sum());
        for j in jobs {
            rt.block_on(e.teardown(j.id())).unwrap();
        }
        (rss, pss, disk)
    };
    let (c_rss, c_pss, c_disk) = idle(&classic);
    let (d_rss, d_pss, d_disk) = idle(&containerd);
    vec![
        format!(
            "| dockerd 26.1, containerd image store: start → first docker CLI answer (ms) | {:.0} | {:.2}× the classic store ({:.0}) |",
            median(&b),
            median(&b) / median(&a),
            median(&a)
        ),
        format!(
            "| dockerd 26.1, containerd image store: idle job RSS / PSS / data-root (MiB) | {d_rss:.1} / {d_pss:.1} / {d_disk:.1} | classic: {c_rss:.1} / {c_pss:.1} / {c_disk:.1} |"
        ),
    ]
}

/// Idle jobs in steps up to `BERTH_BENCH_DENSITY` (section 3). The pool
/// is sized for it: its own id ranges, a /20 of addresses, no ports.
fn density_figures(rt: &tokio::runtime::Runtime, table: &mut Vec<String>) {
    let max: usize = std::env::var("BERTH_BENCH_DENSITY")
        .ok()
        .map(|v| v.parse().expect("BERTH_BENCH_DENSITY is a number of jobs"))
        .unwrap_or(30);
    let mut cfg = common::engine_config(53, "bs-density");
    // Above every test's ranges (1.6e9 + n·8·65536, n < 128).
    cfg.uid_base = 1_700_000_000;
    cfg.uid_ranges = max as u32;
    cfg.net_pool = std::net::Ipv4Addr::new(10, 215, 0, 0);
    cfg.net_pool_prefix = 20;
    cfg.ports_per_job = 0;
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mem_available = || {
        berth::jobs::Host::read(Path::new("/proc"))
            .mem_available
            .expect("MemAvailable in /proc/meminfo")
    };
    std::thread::sleep(Duration::from_secs(2));
    let host_before = mem_available();
    let mut jobs = Vec::new();
    let mut base: Option<(f64, f64)> = None;
    let mut steps: Vec<usize> = [1, 10, 30, 100, 300]
        .into_iter()
        .filter(|&n| n < max)
        .collect();
    steps.push(max);
    for target in steps {
        let t = Instant::now();
        while jobs.len() < target {
            jobs.push(rt.block_on(e.start(None)).unwrap());
        }
        let started = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(10));
        let n = jobs.len() as f64;
        let procs = programs(&jobs);
        let rss = mib(jobs.iter().map(|j| j.rss_bytes()).sum()) / n;
        // Where it goes: PSS by the program that holds it.
        let pss_by_program = by_program(&procs, |_, p| pss_of(p));
        let pss = mib(pss_by_program.values().sum()) / n;
        let host = mib(host_before.saturating_sub(mem_available())) / n;
        // 30 s of nothing asked: what the jobs' health checks, relays and
        // timers, and the engine's, cost.
        let window = Duration::from_secs(30);
        let cpu0: Vec<u64> = procs.iter().map(|(p, _)| cpu_ticks(*p)).collect();
        let self0 = cpu_ticks(std::process::id());
        std::thread::sleep(window);
        let self1 = cpu_ticks(std::process::id());
        let cpu_by_program = by_program(&procs, |k, p| cpu_ticks(p).saturating_sub(cpu0[k]));
        let hz = 100.0; // USER_HZ
        let cores = |ticks: u64| ticks as f64 / hz / window.as_secs_f64();
        let jobs_cpu = cores(cpu_by_program.values().sum());
        let engine_cpu = cores(self1.saturating_sub(self0));
        let cpu_parts = cpu_by_program
            .iter()
            .filter(|(_, t)| **t > 0)
            .map(|(c, t)| format!("{c} {:.3}", cores(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let engine_rss = mib(common::kib_field(&status, "VmRSS").expect("VmRSS") * 1024);
        let answering = jobs
            .iter()
            .filter(|j| {
                common::docker(&j.socket(), &["version", "--format", "{{.Server.Version}}"])
                    .status
                    .success()
            })
            .count();
        let mut by_comm: Vec<(String, u64)> = pss_by_program.into_iter().collect();
        by_comm.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
        let parts = by_comm
            .iter()
            .map(|(c, b)| format!("{c} {:.1}", mib(*b) / n))
            .collect::<Vec<_>>()
            .join(", ");
        let (rss1, pss1) = *base.get_or_insert((rss, pss));
        row(
            table,
            format!(
                "| density, {target} idle jobs: per job RSS / PSS / host MemAvailable lost (MiB); jobs answering | {rss:.1} / {pss:.1} / {host:.1}; {answering}/{target} | PSS {:.2}× one job's ({pss1:.1}), RSS {:.2}× ({rss1:.1}); started in {started:.0} s |",
                pss / pss1,
                rss / rss1
            ),
        );
        row(
            table,
            format!("| density, {target} idle jobs: PSS per job by program (MiB) | {parts} | |"),
        );
        row(
            table,
            format!(
                "| density, {target} idle jobs, 30 s idle: CPU of all jobs / of the engine (cores); engine RSS (MiB) | {jobs_cpu:.3} / {engine_cpu:.3}; {engine_rss:.1} | per job {:.4} cores; jobs' by program: {cpu_parts} |",
                jobs_cpu / n
            ),
        );
    }
    let t = Instant::now();
    let n = jobs.len();
    for j in jobs {
        rt.block_on(e.teardown(j.id())).unwrap();
    }
    row(
        table,
        format!(
            "| density: teardown of {n} idle jobs, one by one (s) | {:.1} | |",
            t.elapsed().as_secs_f64()
        ),
    );
}

/// Section 14: the engine under GOGC and GOMEMLIMIT settings against the
/// default.
fn go_runtime_figures(rt: &tokio::runtime::Runtime, n: usize, table: &mut Vec<String>) {
    const IDLE: usize = 10;
    let settings: [(&str, &str); 4] = [
        ("default", ""),
        ("GOGC=50", "GOGC=50"),
        ("GOGC=25", "GOGC=25"),
        ("GOMEMLIMIT=32MiB", "GOMEMLIMIT=32MiB"),
    ];
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let engines: Vec<berth::sandbox::Engine> = settings
        .iter()
        .enumerate()
        .map(|(k, (_, env))| {
            // The wrapper's directory is the engine's: the job's root
            // mounts it, and dockerd finds the host's containerd and runc
            // on its PATH after it.
            let dir = PathBuf::from(format!("/var/lib/bt/bs-go/{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            let wrapper = dir.join("dockerd");
            std::fs::write(
                &wrapper,
                format!("#!/bin/sh\n{env} exec /usr/sbin/dockerd \"$@\"\n"),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
            // Two tests' pools each: 12 id ranges.
            let mut cfg = common::engine_config(100 + 2 * k as u32, &format!("bs-go-{k}"));
            cfg.uid_ranges = IDLE as u32 + 2;
            cfg.ports_per_job = 0;
            cfg.dockerd = wrapper;
            berth::sandbox::Engine::new(cfg).unwrap()
        })
        .collect();
    // Idle: memory and CPU of 10 jobs, one setting at a time.
    let mut base = None;
    for ((label, _), e) in settings.iter().zip(&engines) {
        let jobs: Vec<_> = (0..IDLE)
            .map(|_| rt.block_on(e.start(None)).unwrap())
            .collect();
        for j in &jobs {
            common::docker_ok(&j.socket(), &["version", "-f", "{{.Server.Version}}"]);
        }
        std::thread::sleep(Duration::from_secs(10));
        let procs = programs(&jobs);
        let pss = by_program(&procs, |_, p| pss_of(p));
        let total = mib(pss.values().sum()) / IDLE as f64;
        let of = |c: &str| mib(pss.get(c).copied().unwrap_or(0)) / IDLE as f64;
        let cpu0: Vec<u64> = procs.iter().map(|(p, _)| cpu_ticks(*p)).collect();
        std::thread::sleep(Duration::from_secs(30));
        let ticks: u64 = procs
            .iter()
            .enumerate()
            .map(|(k, (p, _))| cpu_ticks(*p).saturating_sub(cpu0[k]))
            .sum();
        let cores = ticks as f64 / 100.0 / 30.0;
        let (pss1, cores1) = *base.get_or_insert((total, cores));
        row(
            table,
            format!(
                "| engine {label}, {IDLE} idle jobs: PSS per job (MiB): all / dockerd / containerd; CPU of all (cores) | {total:.1} / {:.1} / {:.1}; {cores:.3} | {:.2}× / {:.2}× the default's |",
                of("dockerd"),
                of("containerd"),
                total / pss1,
                cores / cores1
            ),
        );
        for j in jobs {
            rt.block_on(e.teardown(j.id())).unwrap();
        }
    }
    // Busy: the small job, the settings alternating.
    let runs = n.clamp(3, 10);
    let mut steps: Vec<Vec<[f64; 6]>> = vec![Vec::new(); settings.len()];
    for i in 0..runs {
        for k in 0..settings.len() {
            let k = (k + i) % settings.len();
            steps[k].push(small_job(&engines[k], rt, None));
        }
    }
    let step = |k: usize, s: usize| median(&steps[k].iter().map(|j| j[s]).collect::<Vec<_>>());
    for (k, (label, _)) in settings.iter().enumerate() {
        row(
            table,
            format!(
                "| engine {label}, small job ({runs} runs, settings alternating): start / build (s) | {:.2} / {:.2} | {:.2}× / {:.2}× the default's |",
                step(k, 0),
                step(k, 2),
                step(k, 0) / step(0, 0),
                step(k, 2) / step(0, 2)
            ),
        );
    }
}

/// Every process of every one of `jobs`, with the program it runs.
fn programs(jobs: &[berth::sandbox::Sandbox]) -> Vec<(u32, String)> {
    jobs.iter()
        .flat_map(|j| j.pids())
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            (p, comm.trim().to_string())
        })
        .collect()
}

/// `value(k, pid)` of each of `procs` (the k-th, a pid and its program),
/// summed by program.
fn by_program(
    procs: &[(u32, String)],
    value: impl Fn(usize, u32) -> u64,
) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (k, (p, program)) in procs.iter().enumerate() {
        *out.entry(program.clone()).or_default() += value(k, *p);
    }
    out
}

/// User and system CPU time of a process (all its threads), in clock
/// ticks; 0 for a process gone.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the command's closing parenthesis: state is field 3, utime and
    // stime fields 14 and 15.
    let Some(close) = s.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Proportional set size of a process (shared pages divided among their
/// users), in bytes; 0 for a process gone.
fn pss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            let kb = t.lines().find(|l| l.starts_with("Pss:"))?;
            kb.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes allocated under `dir` (`du -sb`, no links followed).
fn du_bytes(dir: &Path) -> u64 {
    let o = Command::new("du").arg("-sB1").arg(dir).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Seconds of each fresh job's `docker pull big:1` (docker.io/library/big:1,
/// on the upstream only): through an empty cache (a new one each run), a
/// warm one, and with the upstream itself as the mirror; and the blobs the
/// upstream served during the warm pulls.
fn cache_pulls(rt: &tokio::runtime::Runtime, runs: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, usize) {
    use berth::images::{cache::CacheConfig, registries::Registries};
    use berth::sandbox::{Engine, SandboxConfig};
    let host = common::Outside::create(46);
    let up = format!("{}:5000", host.addr);
    let upstream = common::Registry::start(&host.name, "bench-upstream", &up, None, None);
    // What leaves the upstream crosses a 200 Mbit/s link.
    let tc = Command::new("ip")
        .args([
            "netns", "exec", &host.name, "tc", "qdisc", "add", "dev", "bto46n", "root",
        ])
        .args([
            "tbf", "rate", "200mbit", "burst", "256kb", "latency", "50ms",
        ])
        .status()
        .unwrap();
    assert!(tc.success(), "tc qdisc tbf on the upstream's link");
    // dockerd resolves `docker.io` before a pull: a resolver that answers
    // at once, as a CI host's does (the test default is silent).
    let dns = vec![common::spawn_dns_nxdomain()];
    let direct = Engine::new(SandboxConfig {
        registries: Registries {
            mirrors: vec![format!("http://{up}")],
            insecure: vec![up.clone()],
            ..Default::default()
        },
        dns_upstreams: dns.clone(),
        ..common::engine_config(46, "bs-cache-direct")
    })
    .unwrap();
    {
        let sb = rt.block_on(direct.start(None)).unwrap();
        common::import_busybox(&sb.socket());
        let ctx = PathBuf::from("/var/lib/bt/bench-cache-ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM busybox:test\nRUN head -c 120000000 /dev/urandom > /big\n",
        )
        .unwrap();
        let image = format!("{up}/library/big:1");
        common::docker_ok(
            &sb.socket(),
            &["build", "-q", "-t", &image, ctx.to_str().unwrap()],
        );
        common::docker_ok(&sb.socket(), &["push", &image]);
        rt.block_on(direct.teardown(sb.id())).unwrap();
    }
    let pull = |e: &Engine| -> f64 {
        let sb = rt.block_on(e.start(None)).unwrap();
        let t = Instant::now();
        common::docker_ok(&sb.socket(), &["pull", "big:1"]);
        let s = t.elapsed().as_secs_f64();
        rt.block_on(e.teardown(sb.id())).unwrap();
        s
    };
    let cached = |n: u32, name: &str| {
        let c = common::engine_config(n, name);
        let _ = std::fs::remove_dir_all(c.state_dir.join("cache"));
        Engine::new(SandboxConfig {
            cache: CacheConfig {
                enabled: true,
                upstream: format!("http://{up}"),
                max_bytes: 2 << 30,
                ..Default::default()
            },
            dns_upstreams: dns.clone(),
            ..c
        })
        .unwrap()
    };
    let (mut cold, mut with_direct) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        with_direct.push(pull(&direct));
        let e = cached(47, "bs-cache-cold");
        cold.push(pull(&e));
    }
    drop(direct);
    let e = cached(48, "bs-cache-warm");
    pull(&e);
    // The cache keeps what it fetched once it has stored it (its own
    // download, beside the one it streams to the job): the manifest and
    // three blobs are then scheduled for expiry.
    let log = e.cache().unwrap().log();
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("Adding new scheduler entry for library/big@")
        .count()
        < 4
    {
        assert!(Instant::now() < deadline, "the cache never stored big:1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let blobs = || upstream.log_count("\"GET /v2/library/big/blobs/sha256:");
    let before = blobs();
    let warm: Vec<f64> = (0..runs).map(|_| pull(&e)).collect();
    let upstream_blobs = blobs() - before;
    drop(e);
    (cold, warm, with_direct, upstream_blobs)
}

/// Times `teardown` of jobs that each run `containers` sleeping containers
/// (the last one paused).
fn teardown_times(
    e: &berth::sandbox::Engine,
    rt: &tokio::runtime::Runtime,
    containers: usize,
    runs: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let sb = rt.block_on(e.start(None)).unwrap();
        if containers > 0 {
            common::import_busybox(&sb.socket());
        }
        let mut last = String::new();
        for _ in 0..containers {
            last = common::docker_ok(&sb.socket(), &["run", "-d", "busybox:test", "sleep", "600"]);
        }
        if containers > 0 {
            common::docker_ok(&sb.socket(), &["pause", last.trim()]);
        }
        let t = Instant::now();
        rt.block_on(e.teardown(sb.id())).unwrap();
        out.push(ms(t.elapsed()));
    }
    out
}

/// The throughput section's small job on engine `e`: a cold start, busybox
/// imported, a two-stage build, a run of what it built, the teardown.
/// `emulation` as the job API's. Seconds per step, in that order, then the
/// CPU seconds the job's processes used (its cgroups' count).
fn small_job(
    e: &berth::sandbox::Engine,
    rt: &tokio::runtime::Runtime,
    emulation: Option<bool>,
) -> [f64; 6] {
    let lap = |t: &mut Instant| {
        let s = t.elapsed().as_secs_f64();
        *t = Instant::now();
        s
    };
    let mut t = Instant::now();
    let sb = rt
        .block_on(e.start_for(berth::sandbox::StartRequest {
            emulation,
            ..Default::default()
        }))
        .unwrap();
    let start = lap(&mut t);
    let sock = sb.socket();
    common::import_busybox(&sock);
    let import = lap(&mut t);
    let ctx = std::env::temp_dir().join(format!("bt-tp-{}", sb.id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test AS b\nRUN echo ok > /r\nFROM busybox:test\nCOPY --from=b /r /r\nCMD [\"cat\", \"/r\"]\n",
    )
    .unwrap();
    common::docker_ok(&sock, &["build", "-q", "-t", "tp:1", ctx.to_str().unwrap()]);
    let build = lap(&mut t);
    assert_eq!(
        common::docker_ok(&sock, &["run", "--rm", "tp:1"]).trim(),
        "ok"
    );
    let run = lap(&mut t);
    let used = rt.block_on(e.teardown(sb.id())).unwrap().usage;
    let teardown = lap(&mut t);
    let _ = std::fs::remove_dir_all(&ctx);
    let cpu = used.expect("the job's cgroups count its CPU").cpu;
    [start, import, build, run, teardown, cpu.as_secs_f64()]
}

/// The parts of berth's own time in a run, as the runner reports them.
const OWN_PARTS: [&str; 5] = [
    "agent start",
    "job start",
    "teardown",
    "agent stop",
    "other",
];

/// The row of hello runs (each as `hello_overhead` gives it): their own
/// time, its p95 and the median of each part.
fn hello_row(table: &mut Vec<String>, what: &str, runs: &[Vec<f64>]) {
    let part = |k: usize| runs.iter().map(|h| h[k]).collect::<Vec<f64>>();
    let parts = OWN_PARTS
        .iter()
        .enumerate()
        .map(|(k, name)| format!("{name} {:.0}", median(&part(k + 1))))
        .collect::<Vec<_>>()
        .join(", ");
    row(
        table,
        format!(
            "| {what}, {} runs (ms) | {:.0} | p95 {:.0}; medians: {parts} |",
            runs.len(),
            median(&part(0)),
            pct(&part(0), 0.95)
        ),
    );
}

/// `runs` hello pipelines against a served agent (`berth serve`, a process
/// of its own) that keeps one sandbox warm: each run's job is a warm one.
fn hello_served(runs: usize) -> Vec<Vec<f64>> {
    const NAME: &str = "bs-hello-served";
    // Above the load section's ids (1.75e9 + 24 ranges).
    let cfg = PathBuf::from(format!("/var/lib/bt/{NAME}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[sandbox]\nstate_dir = \"/var/lib/bt/{NAME}\"\nuid_base = 1760000000\nuid_ranges = 4\n\
             net_pool = \"10.217.0.0\"\nnet_pool_prefix = 24\n\
             dns_upstreams = [\"127.0.0.1:9\"]\n[serve]\nwarm_pool = 1\n"
        ),
    )
    .unwrap();
    let certs = PathBuf::from(format!("/var/lib/bt/{NAME}-certs"));
    let _ = std::fs::remove_dir_all(&certs);
    let agent = common::Agent::start(
        &cfg,
        &certs,
        Path::new(&format!("/var/lib/bt/{NAME}-agent.log")),
    );
    (0..runs)
        .map(|_| {
            wait_for_warm(&agent);
            hello_overhead(Some(&agent))
        })
        .collect()
}

/// Until `agent`'s warm pool holds a ready sandbox.
fn wait_for_warm(agent: &common::Agent) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = agent.cli(&["capacity", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["warm_ready"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no warm sandbox: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `berth run pipelines/hello.toml`, with its embedded agent or against
/// `served`: berth's own time (wall minus steps), then each of
/// `OWN_PARTS`, as the runner reports them, in ms.
fn hello_overhead(served: Option<&common::Agent>) -> Vec<f64> {
    let mut c = Command::new(common::berth_bin());
    c.args(["run", "pipelines/hello.toml"]);
    match served {
        Some(agent) => {
            c.args(["--endpoint", &agent.endpoint()])
                .arg("--certs-dir")
                .arg(&agent.certs);
        }
        None => {
            c.env("BERTH_STATE_DIR", "/var/lib/bt/bs-hello");
        }
    }
    let o = c.output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "hello pipeline failed:\n{text}");
    let line = text
        .lines()
        .find_map(|l| l.split("berth's own time:").nth(1))
        .expect("the runner reports its own time");
    // "0.60s of 9.60s (agent start 0.04s, job start 0.35s, …; …)"
    let secs_after = |label: &str| -> f64 {
        line.split(label)
            .nth(1)
            .and_then(|r| r.trim().split('s').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in the runner's own time: {line}"))
    };
    let total: f64 = line
        .trim()
        .split('s')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no total in the runner's own time: {line}"));
    let mut out = vec![total * 1000.0];
    out.extend(OWN_PARTS.iter().map(|p| secs_after(p) * 1000.0));
    out
}

fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// A row of the table, shown as it comes.
fn row(t: &mut Vec<String>, s: String) {
    eprintln!("{s}");
    t.push(s);
}

fn workspace_figures(rt: &tokio::runtime::Runtime, n: usize, table: &mut Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let owner = (4242u32, 4343u32);
    let base = PathBuf::from("/var/lib/bt-ws/bench");
    let _ = std::fs::remove_dir_all(&base);
    let ws = base.join("checkout");
    std::fs::create_dir_all(&ws).unwrap();
    for d in [&base, &ws] {
        std::os::unix::fs::chown(d, Some(owner.0), Some(owner.1)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cfg = berth::sandbox::SandboxConfig {
        workspaces: berth::sandbox::fs::workspaces::WorkspacesConfig {
            allowed_roots: vec![base.clone()],
        },
        ..common::engine_config(49, "bs-ws")
    };
    let engine = std::sync::Arc::new(berth::sandbox::Engine::new(cfg).unwrap());
    let with = serde_json::json!({ "workspaces": [{ "path": ws }] });
    let without = serde_json::json!({});
    // Cold (no pool) and warm (a pool of one), each with a workspace
    // against without, alternating.
    for (warm, what, digits) in [(false, "cold", 0), (true, "warm pool", 1)] {
        let fd = common::FrontDoor::start_engine(engine.clone(), "bs-ws", |c| {
            c.warm_pool = usize::from(warm)
        });
        let (mut bare, mut mounted) = (Vec::new(), Vec::new());
        for _ in 0..n {
            bare.extend(ready_latency_of(&fd, rt, warm, true, &without, 1));
            mounted.extend(ready_latency_of(&fd, rt, warm, true, &with, 1));
        }
        row(
            table,
            format!(
                "| job ready, {what}, docker CLI, with a workspace (ms) | {:.*} | {:.*} ({:.2}× without: {:.*}) |",
                digits,
                median(&mounted),
                digits,
                pct(&mounted, 0.95),
                median(&mounted) / median(&bare),
                digits,
                median(&bare)
            ),
        );
    }

    // 500 MB through the workspace: a container in a job against the host.
    let sb = rt
        .block_on(engine.start_job(
            None,
            &[berth::sandbox::WorkspaceRequest {
                path: ws.clone(),
                as_uid: None,
            }],
        ))
        .unwrap();
    let s = sb.socket();
    common::import_busybox(&s);
    let w = ws.display().to_string();
    let cid = common::docker_ok(
        &s,
        &[
            "run",
            "-d",
            "-u",
            "4242:4343",
            "-v",
            &format!("{w}:{w}"),
            "busybox:test",
            "sleep",
            "3600",
        ],
    );
    let cid = cid.trim().to_string();
    // One static binary times the same work where it runs: in the job's
    // container and on the host.
    let timer = PathBuf::from("/var/lib/bt/bench-timed_io");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&timer)
        .arg("tests/clients/timed_io.c")
        .output()
        .expect("gcc (apt-get install gcc libc6-dev)");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::docker_ok(
        &s,
        &[
            "cp",
            timer.to_str().unwrap(),
            &format!("{cid}:/bin/timed_io"),
        ],
    );
    let file = ws.join("big");
    let f = file.display().to_string();
    let write = ["write", f.as_str(), "500"].map(String::from);
    let read = ["read", f.as_str()].map(String::from);
    let secs = |o: std::process::Output| -> f64 {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    let in_job = |args: &[String]| {
        let mut a = vec!["exec", cid.as_str(), "timed_io"];
        a.extend(args.iter().map(String::as_str));
        secs(common::docker(&s, &a))
    };
    let on_host = |args: &[String]| secs(Command::new(&timer).args(args).output().unwrap());
    let (mut jw, mut jr, mut hw, mut hr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Writes: each side a fresh file, fsync'd. Reads: both sides the same
    // file (the last one written), from a cold page cache.
    for _ in 0..n.clamp(1, 8) {
        let _ = std::fs::remove_file(&file);
        drop_caches();
        jw.push(in_job(&write));
        std::fs::remove_file(&file).unwrap();
        drop_caches();
        hw.push(on_host(&write));
    }
    on_host(&read);
    for _ in 0..n.clamp(1, 8) {
        drop_caches();
        jr.push(in_job(&read));
        drop_caches();
        hr.push(on_host(&read));
    }
    let _ = std::fs::remove_file(&file);
    rt.block_on(engine.teardown(sb.id())).unwrap();
    for (what, job, host) in [("write", &jw, &hw), ("read", &jr, &hr)] {
        row(
            table,
            format!(
                "| 500 MB {what} in a job's workspace, container against host (s) | {:.2} | {:.2}× host: {:.2} |",
                median(job),
                median(job) / median(host),
                median(host)
            ),
        );
    }
}

/// The Dockerfile of the project-cache section: a toolchain stage that
/// installs gcc and make from the test host's apt repository (package
/// lists and downloads in cache mounts), a stage that compiles Lua, and a
/// small final image with the binary.
fn lua_dockerfile(registry: &str, apt: &str) -> String {
    format!(
        "FROM {registry}/bench/debian:bookworm AS toolchain\n\
         ARG DEBIAN_FRONTEND=noninteractive\n\
         RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \\\n    \
             --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \\\n    \
             echo 'deb [trusted=yes] http://{apt}/ ./' > /etc/apt/sources.list \\\n    \
             && apt-get update -qq \\\n    \
             && apt-get install -y -qq --no-install-recommends gcc libc6-dev make >/dev/null\n\
         FROM toolchain AS build\n\
         COPY lua/ /src/lua/\n\
         RUN make -C /src/lua -j2 linux >/dev/null && make -C /src/lua test\n\
         FROM {registry}/bench/debian:bookworm\n\
         COPY --from=build /src/lua/src/lua /usr/local/bin/lua\n\
         ENTRYPOINT [\"lua\"]\n"
    )
}

/// What the built interpreter must print for the check run.
const LUA_CHECK: (&str, &str) = ("print(('berth '):rep(2) .. 6 * 7)", "berth berth 42");

/// The docker CLI over a job's front door, with a config dir of its own
/// and `stdin` from a file: its output, or a panic with its errors.
fn pc_docker(job: &common::TlsJob, config: &Path, args: &[&str], stdin: Option<&Path>) -> String {
    let o = Command::new("docker")
        .env_remove("DOCKER_BUILDKIT")
        .env("DOCKER_CONFIG", config)
        .env("DOCKER_HOST", &job.endpoint)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &job.dir)
        .args(args)
        .stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
            None => Stdio::null(),
        })
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server in a test host's namespace, killed on drop.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// busybox httpd serving `dir` on port 80 of `host`.
fn serve_http(host: &common::Outside, dir: &Path) -> Served {
    let child = Command::new("ip")
        .args(["netns", "exec", &host.name, "/bin/busybox", "httpd", "-f"])
        .args(["-p", &format!("{}:80", host.addr), "-h"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let served = Served(child);
    let addr = std::net::SocketAddr::from((host.addr, 80));
    let t = Instant::now();
    while common::in_netns(&host.name, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
    })
    .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "httpd in {} never listened",
            host.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    served
}

/// Used bytes of the filesystem holding `path` (statfs), after a sync.
fn fs_used(path: &Path) -> u64 {
    nix::unistd::sync();
    std::thread::sleep(Duration::from_secs(1));
    nix::unistd::sync();
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    (s.blocks() - s.blocks_free()) * s.fragment_size()
}

/// Project caches (docs/caches.md) through the front door, on one engine
/// with its pool: a multi-stage build in a fresh job against a job of the
/// key that holds the previous run; job ready with an empty key against a
/// 5 GiB one; the pool's growth under 4 jobs of that key.
fn project_cache_figures(rt: &tokio::runtime::Runtime, n: usize, table: &mut Vec<String>) {
    use berth::images::registries::Registries;
    use berth::sandbox::fs::caches::ProjectCachesConfig;
    use berth::sandbox::{Engine, SandboxConfig};
    common::require_tools(&[(&["mkfs.xfs", "-V"], "apt-get install xfsprogs")]);
    let setup_started = Instant::now();
    let setup = PathBuf::from("/var/lib/bt/bs-pc-setup");
    let st = Command::new("benches/support/project-cache-setup")
        .arg(&setup)
        .status()
        .unwrap();
    assert!(st.success(), "benches/support/project-cache-setup failed");

    // The test host: the registry the base image comes from, and the apt
    // repository the toolchain comes from.
    let host = common::Outside::create(90);
    let ip = host.addr.to_string();
    let (ca_pem, cert_pem, key_pem) = common::private_ca_for(&ip);
    let ca_file = PathBuf::from("/var/lib/bt/bs-pc-registry-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let registry = format!("{ip}:5443");
    let _registry = common::Registry::start(
        &host.name,
        "bs-pc",
        &registry,
        Some((&cert_pem, &key_pem)),
        None,
    );
    let _apt = serve_http(&host, &setup.join("repo"));

    let cfg = SandboxConfig {
        project_caches: ProjectCachesConfig {
            enabled: true,
            total_bytes: 24 << 30,
            bytes_per_key: 12 << 30,
        },
        registries: Registries {
            ca: [(registry.clone(), ca_file.clone())].into(),
            ..Default::default()
        },
        ..common::engine_config(84, "bs-pc")
    };
    let pool = cfg.state_dir.join("project-caches");
    let engine = std::sync::Arc::new(Engine::new(cfg).unwrap());
    let fd = common::FrontDoor::start_engine(engine, "bs-pc", |c| c.warm_pool = 0);
    let work = PathBuf::from("/var/lib/bt/bs-pc-work");
    let _ = std::fs::remove_dir_all(&work);
    let config = work.join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let docker = |job: &common::TlsJob, args: &[&str]| pc_docker(job, &config, args, None);
    let rm = |id: &str, outcome: &str| {
        let o = fd.job_cli(&["rm", id, "--outcome", outcome]);
        assert!(
            o.status.success(),
            "job rm: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let cache_cli = |args: &[&str]| {
        Command::new(common::berth_bin())
            .arg("cache")
            .args(args)
            .args(["--endpoint", &fd.endpoint()])
            .arg("--certs-dir")
            .arg(&fd.certs)
            .output()
            .unwrap()
    };
    let key_bytes = |key: &str| -> Option<u64> {
        let o = cache_cli(&["ls", "--json"]);
        assert!(
            o.status.success(),
            "cache ls: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["key"] == key)
            .and_then(|k| k["bytes"].as_u64())
    };

    // The base image, pushed once to the test host's registry by a job.
    let base = format!("{registry}/bench/debian:bookworm");
    {
        let j = fd.create_job(&[]);
        pc_docker(
            &j,
            &config,
            &["import", "--change", "CMD [\"bash\"]", "-", &base],
            Some(&setup.join("base.tar")),
        );
        docker(&j, &["push", "-q", &base]);
        rm(&j.id, "failure");
    }

    // A key of 5 GiB: random bytes in a kept volume (and busybox), made
    // once and kept in the pool for later runs.
    let big = "bench/5g";
    if key_bytes(big).is_none_or(|b| b < 5 << 30) {
        let j = fd.create_job(&["--cache-key", big, "--cache-commit", "on-success"]);
        let o = common::docker_tls_stdin(
            &j,
            &["import", "--change", "ENV PATH=/bin", "-", "busybox:test"],
            Some(common::busybox_tar()),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        docker(
            &j,
            &["volume", "create", "--label", "berth.cache=keep", "ballast"],
        );
        docker(
            &j,
            &[
                "run",
                "--rm",
                "-v",
                "ballast:/b",
                "busybox:test",
                "dd",
                "if=/dev/urandom",
                "of=/b/x",
                "bs=1M",
                "count=5120",
            ],
        );
        rm(&j.id, "success");
    }
    let big_bytes = key_bytes(big).expect("the 5 GiB key is listed");
    assert!(big_bytes >= 5 << 30, "{big} holds {big_bytes} bytes");

    // The build's context: Lua's source and the Dockerfile.
    let ctx = work.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(setup.join("lua"))
        .arg(ctx.join("lua"))
        .status()
        .unwrap();
    assert!(cp.success());
    std::fs::write(
        ctx.join("Dockerfile"),
        lua_dockerfile(&registry, &format!("{ip}:80")),
    )
    .unwrap();
    let lines = Command::new("sh")
        .arg("-c")
        .arg("cat src/*.c src/*.h | wc -l")
        .current_dir(ctx.join("lua"))
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&lines.stdout).trim().to_string();
    let c = ctx.display().to_string();
    // create → built → the image run once, through the front door.
    let build_in = |extra: &[&str]| -> (common::TlsJob, f64) {
        let t = Instant::now();
        let job = fd.create_job(extra);
        docker(&job, &["build", "-q", "-t", "lua-app:1", &c]);
        let out = docker(&job, &["run", "--rm", "lua-app:1", "-e", LUA_CHECK.0]);
        assert_eq!(out.trim(), LUA_CHECK.1);
        (job, t.elapsed().as_secs_f64())
    };
    let key = "bench/lua";
    let keyed = ["--cache-key", key, "--cache-commit", "on-success"];
    let _ = cache_cli(&["rm", key]);
    let setup_secs = setup_started.elapsed().as_secs_f64();
    // The key's first run (empty), untimed as a figure: it fills the key.
    let (j, empty_key_secs) = build_in(&keyed);
    rm(&j.id, "success");
    let lua_c = ctx.join("lua/src/lua.c");
    let (mut fresh, mut same, mut changed, mut commits) = (vec![], vec![], vec![], vec![]);
    let keyed_run = |out: &mut Vec<f64>, commits: &mut Vec<f64>| {
        let (j, s) = build_in(&keyed);
        out.push(s);
        let t = Instant::now();
        rm(&j.id, "success");
        commits.push(t.elapsed().as_secs_f64());
    };
    for i in 0..n {
        let fresh_run = |fresh: &mut Vec<f64>| {
            let (j, s) = build_in(&[]);
            fresh.push(s);
            rm(&j.id, "success");
        };
        if i % 2 == 0 {
            fresh_run(&mut fresh);
        }
        // A one-line change to lua.c, then the same source again.
        let mut text = std::fs::read_to_string(&lua_c).unwrap();
        text.push_str(&format!("/* change {i} */\n"));
        std::fs::write(&lua_c, text).unwrap();
        keyed_run(&mut changed, &mut commits);
        keyed_run(&mut same, &mut commits);
        if i % 2 == 1 {
            fresh_run(&mut fresh);
        }
    }
    let lua_bytes = key_bytes(key).expect("the build's key is listed");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let gib = |b: u64| b as f64 / (1 << 30) as f64;
    row(
        table,
        format!(
            "| project cache: multi-stage BuildKit build of Lua 5.4 ({lines} lines of C; apt from a test host, cache mounts), fresh job without a key: create → built → run (s) | {:.1} | {:.1} |",
            median(&fresh),
            pct(&fresh, 0.95)
        ),
    );
    row(
        table,
        format!(
            "| same, a job whose key holds the previous run, same source (s) | {:.1} | {:.1}× faster than fresh |",
            median(&same),
            median(&fresh) / median(&same)
        ),
    );
    row(
        table,
        format!(
            "| same, a job whose key holds the previous run, after a one-line change to lua.c (s) | {:.1} | {:.1}× faster than fresh |",
            median(&changed),
            median(&fresh) / median(&changed)
        ),
    );
    row(
        table,
        format!(
            "| its commit, `job rm --outcome success` (s) | {:.1} | key {:.0} MiB; the key's first run (empty key) {empty_key_secs:.1} s |",
            median(&commits),
            mib(lua_bytes)
        ),
    );

    // Job ready: an empty key against the 5 GiB key against no key, cold.
    let (mut empty, mut full, mut none) = (vec![], vec![], vec![]);
    for i in 0..n {
        let empty_spec = serde_json::json!({ "cache_key": format!("bench/empty-{i}") });
        let full_spec = serde_json::json!({ "cache_key": big });
        let mut round: [(&serde_json::Value, &mut Vec<f64>); 3] = [
            (&empty_spec, &mut empty),
            (&full_spec, &mut full),
            (&serde_json::json!({}), &mut none),
        ];
        round.rotate_left(i % 3);
        for (spec, out) in round {
            out.extend(ready_latency_of(&fd, rt, false, true, spec, 1));
        }
    }

    row(
        table,
        format!(
            "| keyed job ready, key empty: create → first `docker version` (ms) | {:.0} | {:.0} |",
            median(&empty),
            pct(&empty, 0.95)
        ),
    );
    row(
        table,
        format!(
            "| keyed job ready, key holding {:.1} GiB (ms) | {:.0} | {:.2}× the empty key; no key, cold: {:.0} |",
            gib(big_bytes),
            median(&full),
            median(&full) / median(&empty),
            median(&none)
        ),
    );

    // Disk: 4 jobs of the 5 GiB key at once, each writing 100 MiB.
    let jobs_n = 4u64;
    let before = fs_used(&pool);
    let jobs: Vec<_> = (0..jobs_n)
        .map(|_| fd.create_job(&["--cache-key", big, "--cache-commit", "never"]))
        .collect();
    for j in &jobs {
        docker(
            j,
            &[
                "run",
                "--name",
                "writer",
                "busybox:test",
                "dd",
                "if=/dev/urandom",
                "of=/x",
                "bs=1M",
                "count=100",
                "conv=fsync",
            ],
        );
    }
    let grown = fs_used(&pool).saturating_sub(before);
    for j in &jobs {
        rm(&j.id, "failure");
    }
    row(
        table,
        format!(
            "| pool space taken by {jobs_n} running jobs of the {:.1} GiB key, each wrote 100 MiB (MiB) | {:.0} | {jobs_n} × the key: {:.0} MiB ({:.1}% of it) |",
            gib(big_bytes),
            mib(grown),
            mib(jobs_n * big_bytes),
            100.0 * grown as f64 / (jobs_n * big_bytes) as f64
        ),
    );
    row(
        table,
        format!(
            "| project-cache section's setup (s) | {setup_secs:.0} | debootstrap, apt downloads and the 5 GiB key when not kept from an earlier run |"
        ),
    );
}
