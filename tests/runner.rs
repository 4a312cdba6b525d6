//! `berth run`, `berth doctor` and socket activation, through the real
//! binary.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn berth() -> Command {
    Command::new(berth_bin())
}

fn repo() -> PathBuf {
    std::env::var_os("BERTH_TEST_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

fn pipeline(name: &str, body: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/var/lib/bt/pipelines-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn no_rules_for(name: &str) {
    let rules = Command::new("iptables-save").output().unwrap();
    let text = String::from_utf8_lossy(&rules.stdout);
    for id in jobs_left(name) {
        assert!(!text.contains(&id), "rules of job {id} survived");
    }
}

#[test]
fn the_hello_pipeline_runs_end_to_end_and_cleans_up() {
    if !prerequisites() {
        return;
    }
    let cfg = write_config(30, "run-hello", "");
    let out = berth()
        .arg("run")
        .arg(repo().join("pipelines/hello.toml"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "── [1/4] base image ──",
        // BuildKit (the CLI's default with buildx) names what it built.
        "naming to docker.io/library/hello-app:1",
        "PASS: 3 checks",
        "hello from berth",
        "pipeline hello: passed",
        "torn down",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        jobs_left("run-hello").is_empty(),
        "a job survived: {:?}",
        jobs_left("run-hello")
    );
}

#[test]
fn a_failing_step_fails_the_run_skips_the_rest_and_tears_down() {
    if !prerequisites() {
        return;
    }
    let cfg = write_config(31, "run-fail", "");
    let p = pipeline(
        "fail",
        r#"
name = "failing"
[[step]]
name = "fine"
run = "docker version --format '{{.Server.APIVersion}}'"
[[step]]
name = "breaks"
run = "echo about to fail; exit 3"
[[step]]
name = "never"
run = "echo SHOULD-NOT-RUN"
"#,
    );
    let out = berth()
        .arg("run")
        .arg(&p)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("1.41"), "{text}");
    assert!(
        text.contains("failed (3)") && text.contains("skipped"),
        "{text}"
    );
    assert!(!text.contains("SHOULD-NOT-RUN"));
    assert!(text.contains("pipeline failing: FAILED"));
    assert!(jobs_left("run-fail").is_empty());
    no_rules_for("run-fail");

    // A step over its timeout is stopped, and the run says so (exit 124).
    let p = pipeline(
        "timeout",
        "name = \"slow\"\n[[step]]\nname = \"sleeps\"\nrun = \"sleep 3600\"\ntimeout = \"1s\"\n",
    );
    let t = Instant::now();
    let out = berth()
        .arg("run")
        .arg(&p)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Cut, not run to its end (a bound far from both, whatever the load).
    assert!(t.elapsed() < Duration::from_secs(600));
    assert!(String::from_utf8_lossy(&out.stdout).contains("timed out"));
    assert!(jobs_left("run-fail").is_empty());
}

/// Sends `sig` to `berth run` while its step runs; the step and the job
/// must be gone and the run must say it was interrupted (exit 130).
fn interrupt_mid_step(sig: nix::sys::signal::Signal, n: u32, name: &str) {
    let cfg = write_config(n, name, "");
    let marker = format!("berth-{name}-{}", std::process::id());
    let p = pipeline(
        name,
        &format!(
            "name = \"interrupted\"\n[[step]]\nname = \"long\"\nrun = \"echo started; sleep 3600 # {marker}\"\n"
        ),
    );
    let mut child = berth()
        .arg("run")
        .arg(&p)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("started") {
            break;
        }
    }
    assert!(seen.contains("started"), "{seen}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
    let t = Instant::now();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{sig}: {}", rest.join("\n"));
    // Cut, not run to its end (a bound far from both, whatever the load).
    assert!(t.elapsed() < Duration::from_secs(600));
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
    assert!(jobs_left(name).is_empty(), "{sig} left a job behind");
    // The step's process group is gone too.
    let ps = Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "step survived: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[test]
fn ctrl_c_mid_step_stops_the_step_and_tears_the_job_down() {
    if !prerequisites() {
        return;
    }
    interrupt_mid_step(nix::sys::signal::Signal::SIGINT, 32, "run-sigint");
}

#[test]
fn a_closed_terminal_mid_step_tears_the_job_down_too() {
    if !prerequisites() {
        return;
    }
    // SIGHUP: the terminal (or tmux, or ssh) went away.
    interrupt_mid_step(nix::sys::signal::Signal::SIGHUP, 37, "run-sighup");
}

#[test]
fn doctor_reports_a_missing_prerequisite_with_its_fix() {
    if !prerequisites() {
        return;
    }
    let ok_cfg = write_config(33, "doctor-ok", "");
    let out = berth()
        .args([
            "doctor",
            "--listen",
            "127.0.0.1:0",
            "--certs-dir",
            "/var/lib/bt/doctor-certs",
            "--config",
        ])
        .arg(&ok_cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for check in [
        "root",
        "capabilities",
        "user namespaces",
        "uid pool",
        "dockerd",
        "cgroups",
        "iptables",
        "port",
        "certificates",
        // The test's 8 id ranges bound it, not the host.
        "capacity",
        "inotify instances",
        "inotify watches",
        "kernel keys",
        "kernel key bytes",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(check) && l.contains(" ok ")),
            "{check}: {text}"
        );
    }
    assert!(text.contains("at most 8 jobs, bound by slots"), "{text}");
    let instances = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances").unwrap();
    assert!(
        text.contains(&format!("{} inotify instances per job", instances.trim())),
        "{text}"
    );
    let keys = std::fs::read_to_string("/proc/sys/kernel/keys/maxkeys").unwrap();
    assert!(
        text.contains(&format!("{} keys per job", keys.trim())),
        "{text}"
    );
    let subuid = std::path::Path::new("/var/lib/bt/doctor-bad-subuid");
    std::fs::write(subuid, "alice:100000:65536\nbob:lots:65536\n").unwrap();
    let bad = write_config(
        33,
        "doctor-bad",
        &format!(
            "dockerd = \"/nonexistent/dockerd\"\nsubuid_file = \"{}\"",
            subuid.display()
        ),
    );
    let out = berth()
        .args(["doctor", "--listen", "127.0.0.1:0", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("dockerd") && l.contains("FAIL")),
        "{text}"
    );
    assert!(text.contains("fix: apt-get install docker.io"), "{text}");
    // A subuid file the pool cannot read is named, with its bad line.
    assert!(
        text.lines().any(|l| l.starts_with("uid pool")
            && l.contains("FAIL")
            && l.contains("doctor-bad-subuid")),
        "{text}"
    );

    // An agent without CAP_KILL (a container started with the capability
    // list of before) could not end a job whose processes run as the job's
    // own ids: the doctor names it, and a run refuses to start a job.
    let without_kill = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--bounding-set", "-kill", "--"])
            .arg(berth_bin())
            .args(args)
            .arg("--config")
            .arg(&ok_cfg)
            .output()
            .expect("setpriv (util-linux) runs berth without CAP_KILL")
    };
    let out = without_kill(&["doctor", "--listen", "127.0.0.1:0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("capabilities")
            && l.contains("FAIL")
            && l.contains("missing: KILL (signalling a job's processes")),
        "{text}"
    );
    assert!(
        text.contains("fix: give them to the agent's container: --cap-add KILL"),
        "{text}"
    );
    let hello = repo().join("pipelines/hello.toml");
    let out = without_kill(&["run", hello.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    // EX_UNAVAILABLE, as berth serve exits for a missing prerequisite.
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("the agent lacks capabilities it needs: KILL")
            && err.contains("--cap-add KILL"),
        "{err}"
    );
    assert!(jobs_left("doctor-ok").is_empty());
}

/// `berth serve` as systemd starts it: its listening socket on fd 3
/// (`LISTEN_FDS=1`, `LISTEN_PID` = its pid), stderr piped. Returns the
/// agent and its port.
fn serve_activated(cfg: &Path, certs: &Path) -> (std::process::Child, u16) {
    serve_activated_with(cfg, certs, &[])
}

#[test]
fn serve_takes_a_socket_from_systemd_socket_activation() {
    if !prerequisites() {
        return;
    }
    let cfg = write_config(34, "socket-act", "");
    let certs = Path::new("/var/lib/bt/socket-act-certs");
    let _ = std::fs::remove_dir_all(certs);
    // systemd's readiness protocol (Type=notify): a datagram socket named
    // by NOTIFY_SOCKET.
    let notify_path = Path::new("/var/lib/bt/socket-act-notify.sock");
    let _ = std::fs::remove_file(notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(300)))
        .unwrap();
    let (mut agent, port) = serve_activated_with(&cfg, certs, &[("NOTIFY_SOCKET", notify_path)]);
    let mut err = BufReader::new(agent.stderr.take().unwrap()).lines();
    let serving = err
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("berth serving"))
        .expect("the agent says where it serves");
    assert!(serving.contains(&format!("127.0.0.1:{port}")), "{serving}");
    std::thread::spawn(move || for _ in err {});
    // Ready once it serves (the bound only ends a failure).
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert!(
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let out = berth()
        .args([
            "job",
            "create",
            "--json",
            "--endpoint",
            &format!("127.0.0.1:{port}"),
            "--certs-dir",
        ])
        .arg(certs)
        .arg("--out")
        .arg(certs.join("job"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = TlsJob::from_create_json(&v, certs.join("job"));
    assert_eq!(
        docker_tls_ok(&job, &["version", "--format", "{{.Server.APIVersion}}"]).trim(),
        "1.41"
    );
    // SIGTERM: the agent drains and tears its jobs down.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).expect("STOPPING=1 on NOTIFY_SOCKET");
    assert!(
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
    );
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(jobs_left("socket-act").is_empty());
    let _ = std::fs::remove_file(notify_path);
}

/// An agent process that is stopped (SIGTERM, waited for) however the test
/// ends.
struct Stopped(std::process::Child);

impl Stopped {
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.0.wait().unwrap()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

#[test]
fn a_flood_of_unauthenticated_peers_makes_a_few_log_lines() {
    if !prerequisites() {
        return;
    }
    let cfg = write_config(45, "log-flood", "");
    let certs = Path::new("/var/lib/bt/log-flood-certs");
    let _ = std::fs::remove_dir_all(certs);
    let (agent, port) = serve_activated(&cfg, certs);
    let mut agent = Stopped(agent);
    let mut err = BufReader::new(agent.0.stderr.take().unwrap()).lines();
    // The engine's versions, then the address it serves on.
    let first = err
        .by_ref()
        .take(5)
        .map(Result::unwrap)
        .find(|l| l.contains(&format!("127.0.0.1:{port}")));
    assert!(first.is_some(), "the agent never said where it listens");
    let lines = std::thread::spawn(move || err.map_while(Result::ok).collect::<Vec<String>>());
    let ca = std::fs::read(certs.join("admin/ca.pem")).unwrap();
    let started = Instant::now();
    let rt = rt();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for i in 0..300 {
            if i % 3 == 0 {
                // TLS without a client certificate.
                if let Ok(mut s) = tls_connect(port, &ca, None).await {
                    let mut b = [0u8; 1];
                    let _ = s.read(&mut b).await;
                }
            } else {
                let mut t = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                // Garbage in place of a ClientHello, or plaintext HTTP.
                let garbage: &[u8] = if i % 3 == 1 {
                    &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]
                } else {
                    b"GET / HTTP/1.1\r\n\r\n"
                };
                let _ = t.write_all(garbage).await;
                let mut b = Vec::new();
                let _ = t.read_to_end(&mut b).await;
            }
        }
    });
    let elapsed = started.elapsed();
    assert!(agent.stop().success());
    let lines = lines.join().unwrap();
    let refusals: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.contains("WARN")
                && (l.contains("handshake") || l.contains("plaintext") || l.contains("certificate"))
        })
        .collect();
    // At most one line per reason per 10 s (five reasons), however long the
    // flood took on this machine.
    let windows = elapsed.as_secs() / 10 + 1;
    assert!(!refusals.is_empty(), "refusals went unlogged: {lines:?}");
    assert!(
        refusals.len() as u64 <= 5 * windows,
        "{} lines for 300 refused peers in {elapsed:?}:\n{}",
        refusals.len(),
        refusals
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        refusals.iter().any(|l| l.contains("plaintext")),
        "{refusals:?}"
    );
}

#[test]
fn json_logs_name_the_job_of_every_line_they_can() {
    if !prerequisites() {
        return;
    }
    let cfg = write_config(32, "run-json", "");
    let p = pipeline(
        "json",
        r#"
name = "json-logs"
[[step]]
name = "ping"
run = "docker version --format '{{.Server.APIVersion}}'"
"#,
    );
    let out = berth()
        .args(["--log-format", "json", "run"])
        .arg(&p)
        .arg("--config")
        .arg(&cfg)
        .env("BERTH_LOG", "berth=debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ready = lines
        .iter()
        .find(|l| l["message"] == "job ready")
        .unwrap_or_else(|| panic!("no 'job ready' line: {stderr}"));
    let job = ready["job"].as_str().unwrap().to_string();
    assert!(
        ready["level"] == "INFO" && ready["timestamp"].is_string(),
        "{ready}"
    );
    // Lines logged while serving the job's connections carry the job and
    // the client through their span.
    let in_span = lines
        .iter()
        .filter(|l| {
            l["spans"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"] == "conn" && s["job"] == job.as_str())
            })
        })
        .count();
    assert!(
        in_span > 0,
        "no line in a connection span of job {job}: {stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "job torn down" && l["job"] == job.as_str())
    );
}

#[test]
fn a_bad_ca_stops_serve_before_anything_on_the_host_changes() {
    if !prerequisites() {
        return;
    }
    let base = PathBuf::from("/var/lib/bt/serve-badca");
    let _ = std::fs::remove_dir_all(&base);
    let ca = base.join("certs/ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("cert.pem"), "not a certificate\n").unwrap();
    std::fs::write(ca.join("key.pem"), "not a key\n").unwrap();
    let state = base.join("state");
    let parent = "berth-badca-test";
    let cfg = base.join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[serve]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\n[sandbox]\nstate_dir = {:?}\ncgroup_parent = \"{parent}\"\nnet_pool = \"10.214.32.0\"\nnet_pool_prefix = 24\n",
            base.join("certs"),
            state
        ),
    )
    .unwrap();
    let out = berth()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started with a broken CA");
    assert!(
        stderr.contains("key.pem"),
        "the error does not name the file: {stderr}"
    );
    // Nothing of the engine was made: no state dir, no cgroup parent.
    assert!(!state.exists(), "the state dir was created: {stderr}");
    let cgroups = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .any(|c| {
            c.path().join(parent).exists()
                || std::fs::read_dir(c.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|d| d.path().join(parent).exists())
        });
    assert!(!cgroups && !Path::new("/sys/fs/cgroup").join(parent).exists());
    let _ = std::fs::remove_dir_all(&base);
}
