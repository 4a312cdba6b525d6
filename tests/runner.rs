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
        "Successfully tagged hello-app:1",
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
        "user namespaces",
        "uid pool",
        "dockerd",
        "cgroups",
        "iptables",
        "port",
        "certificates",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(check) && l.contains(" ok ")),
            "{check}: {text}"
        );
    }
    let bad = write_config(33, "doctor-bad", "dockerd = \"/nonexistent/dockerd\"");
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
}

/// `berth serve` as systemd starts it: its listening socket on fd 3
/// (`LISTEN_FDS=1`, `LISTEN_PID` = its pid), stderr piped. Returns the
/// agent and its port.
fn serve_activated(cfg: &Path, certs: &Path) -> (std::process::Child, u16) {
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

#[test]
fn serve_takes_a_socket_from_systemd_socket_activation() {
    if !prerequisites() {
        return;
    }
    let cfg = write_config(34, "socket-act", "");
    let certs = Path::new("/var/lib/bt/socket-act-certs");
    let _ = std::fs::remove_dir_all(certs);
    let (mut agent, port) = serve_activated(&cfg, certs);
    let mut err = BufReader::new(agent.stderr.take().unwrap()).lines();
    let first = err.next().unwrap().unwrap();
    assert!(first.contains(&format!("127.0.0.1:{port}")), "{first}");
    std::thread::spawn(move || for _ in err {});
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
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(jobs_left("socket-act").is_empty());
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
    let first = err.next().unwrap().unwrap();
    assert!(first.contains(&format!("127.0.0.1:{port}")), "{first}");
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
