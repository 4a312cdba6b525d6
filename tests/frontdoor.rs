//! The mutual-TLS front door with real, unmodified clients over real TLS: the
//! docker CLI with DOCKER_TLS_VERIFY=1, bollard, `berth job`, and raw TLS
//! clients for what the others never send.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_docker_cli_works_unchanged_over_mutual_tls() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(20, "fd-cli");
    let job = fd.create_job(&["--ttl", "10m"]);
    assert!(
        job.endpoint.starts_with("tcp://127.0.0.1:"),
        "{}",
        job.endpoint
    );
    let v = docker_tls_ok(&job, &["version", "--format", "{{.Server.APIVersion}}"]);
    assert_eq!(v.trim(), "1.41");
    assert!(docker_tls_ok(&job, &["info", "--format", "{{.CgroupDriver}}"]).contains("cgroupfs"));
    import_busybox_tls(&job);
    assert_eq!(
        docker_tls_ok(&job, &["run", "--rm", "busybox:test", "echo", "ran"]).trim(),
        "ran"
    );

    // stdin to a container, EOF carried through the hijack: prints hi and exits.
    let o = docker_tls_stdin(
        &job,
        &["run", "-i", "--rm", "busybox:test", "cat"],
        Some(b"hi\n"),
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "hi\n");

    // run -d + logs -f follows to the end.
    docker_tls_ok(
        &job,
        &[
            "run",
            "-d",
            "--name",
            "talker",
            "busybox:test",
            "sh",
            "-c",
            "for i in 1 2 3; do echo line$i; sleep 0.2; done",
        ],
    );
    assert_eq!(
        docker_tls_ok(&job, &["logs", "-f", "talker"]),
        "line1\nline2\nline3\n"
    );

    // exec, exec -i, exec -it through a pty, attach.
    docker_tls_ok(
        &job,
        &["run", "-d", "--name", "box", "busybox:test", "sleep", "600"],
    );
    assert_eq!(
        docker_tls_ok(&job, &["exec", "box", "echo", "in-box"]).trim(),
        "in-box"
    );
    let o = docker_tls_stdin(&job, &["exec", "-i", "box", "cat"], Some(b"through-stdin"));
    assert_eq!(out(&o), "through-stdin");
    let pty = Command::new("script")
        .args([
            "-qec",
            "docker exec -it box sh -c 'tty; echo pty-ok'",
            "/dev/null",
        ])
        .env("DOCKER_HOST", &job.endpoint)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &job.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = out(&pty).replace('\r', "");
    assert!(
        text.contains("/dev/pts/") && text.contains("pty-ok"),
        "exec -it: {text:?} {}",
        err(&pty)
    );
    docker_tls_ok(
        &job,
        &[
            "run",
            "-d",
            "--name",
            "late",
            "busybox:test",
            "sh",
            "-c",
            "sleep 1; echo attached-output",
        ],
    );
    assert!(docker_tls_ok(&job, &["attach", "late"]).contains("attached-output"));

    // cp both ways.
    let src = fd.certs.join("cp-src.txt");
    std::fs::write(&src, "copied content\n").unwrap();
    docker_tls_ok(&job, &["cp", src.to_str().unwrap(), "box:/tmp/in.txt"]);
    let back = fd.certs.join("cp-back.txt");
    docker_tls_ok(&job, &["cp", "box:/tmp/in.txt", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "copied content\n");

    // build, then save piped into load.
    let ctx = fd.certs.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"),
        "FROM busybox:test AS a\nRUN echo two-stage > /o\nFROM busybox:test\nCOPY --from=a /o /o\nCMD [\"cat\", \"/o\"]\n").unwrap();
    docker_tls_ok(&job, &["build", "-q", "-t", "app:1", ctx.to_str().unwrap()]);
    assert_eq!(
        docker_tls_ok(&job, &["run", "--rm", "app:1"]).trim(),
        "two-stage"
    );
    let saved = docker_tls(&job, &["save", "app:1"]);
    assert!(saved.status.success() && saved.stdout.len() > 100_000);
    docker_tls_ok(&job, &["rmi", "app:1"]);
    let loaded = docker_tls_stdin(&job, &["load"], Some(&saved.stdout));
    assert!(
        out(&loaded).contains("Loaded image: app:1"),
        "{}",
        err(&loaded)
    );

    // events with --since/--until, networks, volumes, ps, rm.
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let since = (unix_now() - 1).to_string();
    docker_tls_ok(&job, &["network", "create", "net1"]);
    docker_tls_ok(&job, &["volume", "create", "vol1"]);
    // The event happened before this moment by construction, whatever the
    // machine's load; an `--until` just ahead makes events return once it
    // passes.
    let until = (unix_now() + 2).to_string();
    let ev = docker_tls_ok(
        &job,
        &[
            "events",
            "--since",
            &since,
            "--until",
            &until,
            "--filter",
            "type=network",
        ],
    );
    assert!(ev.contains("net1"), "events: {ev}");
    assert!(docker_tls_ok(&job, &["ps", "--format", "{{.Names}}"]).contains("box"));
    docker_tls_ok(&job, &["rm", "-f", "box", "talker", "late"]);
    assert!(!docker_tls_ok(&job, &["ps", "-a", "--format", "{{.Names}}"]).contains("box"));
}

#[test]
fn the_older_hijack_without_upgrade_header_is_a_raw_pipe_with_half_close() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(21, "fd-hijack");
    let job = fd.create_job(&[]);
    import_busybox_tls(&job);
    let cid = docker_tls_ok(&job, &["run", "-d", "busybox:test", "sleep", "600"])
        .trim()
        .to_string();
    let rt = rt();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Create an exec of `cat` with stdin attached.
        let body = r#"{"AttachStdin":true,"AttachStdout":true,"AttachStderr":true,"Tty":false,"Cmd":["cat"]}"#;
        let req = format!(
            "POST /v1.41/containers/{cid}/exec HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let resp = tls_request(fd.port, &job.dir, req.as_bytes()).await.unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 201"), "{text}");
        let v: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let exec_id = v["Id"].as_str().unwrap().to_string();

        // Start it the old way: no Upgrade header.
        let ca = std::fs::read(job.dir.join("ca.pem")).unwrap();
        let cert = std::fs::read(job.dir.join("cert.pem")).unwrap();
        let key = std::fs::read(job.dir.join("key.pem")).unwrap();
        let mut s = tls_connect(fd.port, &ca, Some((&cert, &key))).await.unwrap();
        // The client lists AES-256 first; the server picks AES-128-GCM.
        assert_eq!(
            s.get_ref().1.negotiated_cipher_suite().map(|c| c.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let body = r#"{"Detach":false,"Tty":false}"#;
        let req = format!(
            "POST /v1.41/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("application/vnd.docker.raw-stream"), "{head}");
        assert!(!head.contains("transfer-encoding: chunked"), "{head}");
        // Raw stdin, then half-close (close_notify): cat sees EOF, its output
        // still comes back, then the stream ends.
        s.write_all(b"raw-pipe-data\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("the exec ends once stdin is closed")
            .unwrap();
        // Multiplexed stream: 8-byte frame header (stream 1 = stdout), then data.
        assert!(rest.len() >= 8 && rest[0] == 1, "{rest:?}");
        assert_eq!(&rest[8..], b"raw-pipe-data\n");
    });
}

/// Forty clients held open on four jobs at once (`_ping`, `logs -f`,
/// `events`, `exec` with stdin; tests/common/load.rs) for 20 s: none is
/// dropped, every kind got through, and every echo came back whole. The
/// bench suite's load section runs 200 for minutes and times the pings.
#[test]
fn many_clients_on_many_jobs_at_once_are_all_served_to_the_end() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(108, "fd-load");
    let jobs: Vec<TlsJob> = (0..4)
        .map(|_| {
            let job = fd.create_job(&[]);
            load::prepare(&job);
            job
        })
        .collect();
    let mix = load::Mix {
        pingers: 3,
        followers: 3,
        watchers: 2,
        execs: 2,
    };
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let out = rt().block_on(load::run(&jobs, &fd.endpoint(), mix, until));
    assert_eq!(
        out.dropped, 0,
        "{} of 40 clients dropped: {out:?}",
        out.dropped
    );
    assert!(
        !out.pings.is_empty() && out.lines > 0 && out.echoes > 0 && out.events > 0,
        "a kind of client got nothing through: {out:?}"
    );
}

#[test]
fn bollard_with_client_certificates() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(22, "fd-bollard");
    let job = fd.create_job(&[]);
    import_busybox_tls(&job);
    let rt = rt();
    rt.block_on(async {
        let docker = bollard::Docker::connect_with_ssl(
            &format!("127.0.0.1:{}", fd.port),
            &job.dir.join("key.pem"),
            &job.dir.join("cert.pem"),
            &job.dir.join("ca.pem"),
            30,
            bollard::API_DEFAULT_VERSION,
        )
        .unwrap();
        let v = docker.version().await.unwrap();
        assert_eq!(v.api_version.as_deref(), Some("1.41"));
        let cfg = bollard::models::ContainerCreateBody {
            image: Some("busybox:test".into()),
            cmd: Some(vec!["sh".into(), "-c".into(), "echo from-bollard".into()]),
            ..Default::default()
        };
        let c = docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                cfg,
            )
            .await
            .unwrap();
        docker
            .start_container(
                &c.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .unwrap();
        use futures_util::StreamExt;
        let mut wait = docker.wait_container(
            &c.id,
            None::<bollard::query_parameters::WaitContainerOptions>,
        );
        while let Some(w) = wait.next().await {
            w.unwrap();
        }
        let mut logs = docker.logs(
            &c.id,
            Some(bollard::query_parameters::LogsOptions {
                stdout: true,
                ..Default::default()
            }),
        );
        let mut text = String::new();
        while let Some(l) = logs.next().await {
            text.push_str(&l.unwrap().to_string());
        }
        assert_eq!(text.trim(), "from-bollard");
        let list = docker
            .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                all: true,
                ..Default::default()
            }))
            .await
            .unwrap();
        assert_eq!(list.len(), 1);
    });
}

/// `GET /_ping` on a fresh TLS connection with an optional client bundle.
async fn ping_with(
    port: u16,
    ca: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(port, ca, client).await?;
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(buf)
}

#[test]
fn every_wrong_key_is_refused() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(23, "fd-refuse");
    let a = fd.create_job(&[]);
    let b = fd.create_job(&[]);
    import_busybox_tls(&a);
    docker_tls_ok(
        &a,
        &[
            "run",
            "-d",
            "--name",
            "only-in-a",
            "busybox:test",
            "sleep",
            "600",
        ],
    );
    // Another job's certificate opens that job, never this one.
    assert!(!docker_tls_ok(&b, &["ps", "-a"]).contains("only-in-a"));
    assert!(docker_tls_ok(&a, &["ps"]).contains("only-in-a"));
    let o = docker_tls(&b, &["exec", "only-in-a", "true"]);
    assert!(!o.status.success());

    let rt = rt();
    let ca = std::fs::read(a.dir.join("ca.pem")).unwrap();
    rt.block_on(async {
        // No client certificate: the handshake fails.
        let r = ping_with(fd.port, &ca, None).await;
        assert!(r.is_err(), "served without a certificate: {r:?}");
        // A certificate from another CA: refused.
        let other = fd.certs.join("other-ca");
        berth::pki::init_dind_layout(&other, &[]).unwrap();
        let cert = std::fs::read(other.join("client/cert.pem")).unwrap();
        let key = std::fs::read(other.join("client/key.pem")).unwrap();
        let r = ping_with(fd.port, &ca, Some((&cert, &key))).await;
        assert!(
            r.is_err() || r.as_ref().unwrap().is_empty(),
            "served another CA's certificate: {r:?}"
        );
        // The admin certificate opens no daemon; a job certificate opens no job API.
        let resp = tls_request(
            fd.port,
            &fd.certs.join("admin"),
            b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 403"));
        let resp = tls_request(
            fd.port,
            &a.dir,
            b"GET /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 403"));
    });

    // Plaintext HTTP on the TLS port: a one-line 400, no API.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", fd.port)).unwrap();
    plain
        .write_all(b"GET /v1.41/containers/json HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = plain.read_to_string(&mut text);
    assert!(
        text.starts_with("HTTP/1.0 400") && text.contains("HTTPS"),
        "{text}"
    );
    assert!(!text.contains("only-in-a"));
    // Port 2375 is never opened.
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:2375".parse().unwrap(),
            Duration::from_secs(1)
        )
        .is_err()
    );

    // An ended job's certificate: a clear refusal.
    let rm = fd.job_cli(&["rm", &a.id]);
    assert!(rm.status.success(), "{}", err(&rm));
    let o = docker_tls(&a, &["ps"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("has ended"), "{}", err(&o));
    // The other job is unaffected.
    docker_tls_ok(&b, &["version"]);
}

#[test]
fn bad_input_gets_a_clear_error_and_the_agent_keeps_serving() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(24, "fd-badinput");
    let job = fd.create_job(&[]);
    let admin = fd.certs.join("admin");
    let rt = rt();
    // A client that connects and says nothing holds nothing up: it stays
    // open while everyone below is served.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", fd.port)).unwrap();
    rt.block_on(async {
        let status = |resp: Vec<u8>| String::from_utf8_lossy(&resp).lines().next().unwrap_or("").to_string();
        // Malformed HTTP.
        let r = tls_request(fd.port, &job.dir, b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
        assert!(status(r.clone()).starts_with("HTTP/1.1 400"), "{:?}", status(r));
        // Oversized headers (over the 64 KiB limit, and small enough to be
        // sent whole before the agent answers and closes).
        let big = format!("GET /_ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
        let r = tls_request(fd.port, &job.dir, big.as_bytes()).await.unwrap();
        assert!(status(r.clone()).starts_with("HTTP/1.1 431"), "{:?}", status(r));
        // Invalid JSON, wrong content type, unknown fields, absurd TTL on the job API.
        for (ctype, body, want) in [
            ("application/json", "{not json", "400"),
            ("text/plain", "{}", "415"),
            ("application/json", r#"{"tll": 5}"#, "400"),
            ("application/json", r#"{"ttl": "999d"}"#, "400"),
        ] {
            let req = format!(
                "POST /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let r = tls_request(fd.port, &admin, req.as_bytes()).await.unwrap();
            let text = String::from_utf8_lossy(&r).to_string();
            assert!(text.starts_with(&format!("HTTP/1.1 {want}")), "{body}: {text}");
            assert!(text.contains("\"message\""), "{text}");
        }
        // What is only read takes GET alone.
        for path in ["/berth/v1/metrics", "/berth/v1/capacity", "/berth/v1/pool", &format!("/berth/v1/jobs/{}/audit", job.id)] {
            let req = format!("DELETE {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let r = tls_request(fd.port, &admin, req.as_bytes()).await.unwrap();
            assert!(status(r.clone()).starts_with("HTTP/1.1 405"), "{path}: {:?}", status(r));
        }
        // TLS garbage instead of a ClientHello: the agent ends the
        // connection (at most a TLS alert, never HTTP). The bound only ends
        // a failure.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut t = tokio::net::TcpStream::connect(("127.0.0.1", fd.port)).await.unwrap();
        t.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0xff, 0xff]).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(120), t.read_to_end(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "the agent kept a connection that sent TLS garbage"
        );
        assert!(buf.len() < 16 && !buf.starts_with(b"HTTP"), "{buf:?}");
    });
    // Everyone else is still served.
    docker_tls_ok(&job, &["version"]);
    let second = fd.create_job(&[]);
    docker_tls_ok(&second, &["version"]);
}

#[test]
fn the_job_api_and_cli_create_list_remove_and_expire_jobs() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(25, "fd-api");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert_eq!(mode(&fd.certs.join("admin").join(f)), 0o600, "admin/{f}");
    }
    assert_eq!(mode(&fd.certs.join("ca/key.pem")), 0o600);
    assert_eq!(mode(&fd.certs.join("server/key.pem")), 0o600);

    // Plain output is what a shell evaluates.
    let o = fd.job_cli(&[
        "create",
        "--ttl",
        "5m",
        "--label",
        "pipeline=demo",
        "--out",
        fd.certs.join("plain").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let line = out(&o);
    assert!(
        line.starts_with("export DOCKER_HOST=tcp://127.0.0.1:")
            && line.contains("DOCKER_TLS_VERIFY=1")
            && line.contains("DOCKER_CERT_PATH="),
        "{line}"
    );
    assert_eq!(mode(&fd.certs.join("plain/key.pem")), 0o600);

    let short = fd.create_job(&["--ttl", "4s"]);
    docker_tls_ok(&short, &["version"]);
    let ls = fd.job_cli(&["ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(out(&fd.job_cli(&["ls"])).contains("pipeline"));

    // Expiry tears the job down and its certificate stops working.
    std::thread::sleep(Duration::from_secs(6));
    let o = docker_tls(&short, &["version"]);
    assert!(!o.status.success(), "an expired job still answers");
    let list: serde_json::Value =
        serde_json::from_slice(&fd.job_cli(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let state = Path::new("/var/lib/bt/fd-api/jobs").join(&short.id);
    assert!(!state.exists(), "expired job's state survived");

    // rm of an unknown job is a clear error.
    let o = fd.job_cli(&["rm", "0123456789ab"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("no such job"), "{}", err(&o));
}

#[test]
fn a_client_that_disconnects_cancels_the_work_upstream() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(26, "fd-cancel");
    let job = fd.create_job(&[]);
    import_busybox_tls(&job);
    let ctx = fd.certs.join("slow");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test\nRUN sleep 3600 && touch /finished\n",
    )
    .unwrap();
    let mut build = Command::new("docker")
        .args(["build", "-t", "slow:1", ctx.to_str().unwrap()])
        .env("DOCKER_HOST", &job.endpoint)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &job.dir)
        // The legacy builder runs each step as a container `docker ps`
        // shows; BuildKit's cancel on a vanished client is covered in
        // tests/buildkit.rs.
        .env("DOCKER_BUILDKIT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the RUN step's container is running.
    let mut running = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if docker_tls_ok(&job, &["ps", "-q"]).trim().len() >= 12 {
            running = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(running, "the build step never started");
    build.kill().unwrap();
    build.wait().unwrap();
    // dockerd sees the disconnect through berth and cancels the build: its
    // container goes away long before the hour-long step could finish.
    let mut gone = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if docker_tls_ok(&job, &["ps", "-q"]).trim().is_empty() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "the build kept running after its client went away");
    assert!(!docker_tls_ok(&job, &["images"]).contains("slow"));
}

#[test]
fn silent_clients_time_out_and_shutdown_tears_jobs_down() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start_with(27, "fd-shutdown", |c| {
        c.handshake_timeout = Duration::from_secs(1)
    });
    let job = fd.create_job(&[]);
    docker_tls_ok(&job, &["version"]);
    // A TCP client that never starts a handshake is dropped after the timeout.
    use std::io::Read;
    // The agent closes it (end of stream, not our own read timeout, which
    // only bounds a failure).
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", fd.port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut buf = [0u8; 16];
    loop {
        match idle.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("the agent sent {n} bytes to a silent client"),
            // A socket with a receive timeout returns EINTR whenever this
            // process catches a signal (SIGCHLD of any test's child), even
            // under SA_RESTART: read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("the agent kept a silent client: {e}"),
        }
    }
    // Shutdown (SIGTERM in `berth serve`) tears every job down.
    let state = Path::new("/var/lib/bt/fd-shutdown/jobs").join(&job.id);
    assert!(state.exists());
    drop(fd);
    assert!(!state.exists(), "a job survived the agent's shutdown");
}

#[test]
fn a_warm_pool_hands_out_fresh_sandboxes_at_once_and_refills() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start_with(28, "fd-pool", |c| c.warm_pool = 2);
    let state = Path::new("/var/lib/bt/fd-pool/jobs");
    let dirs = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(state)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if dirs().len() >= n && ready_count() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the pool never reached {n} sandboxes: {:?}", dirs());
    };
    fn ready_count() -> usize {
        std::fs::read_dir("/var/lib/bt/fd-pool/jobs")
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().join("api/docker.sock").exists())
                    .count()
            })
            .unwrap_or(0)
    }
    wait_for(2);
    let warm = dirs();
    // The next job is one of the warm sandboxes, handed out at once.
    let t = std::time::Instant::now();
    let a = fd.create_job(&[]);
    let took = t.elapsed();
    assert!(
        warm.contains(&a.id),
        "job {} was not taken from the pool {warm:?}",
        a.id
    );
    docker_tls_ok(&a, &["version"]);
    // Fresh: no containers, no images, nothing of any other job.
    assert_eq!(docker_tls_ok(&a, &["ps", "-aq"]).trim(), "");
    assert_eq!(docker_tls_ok(&a, &["images", "-q"]).trim(), "");
    // The pool refills in the background.
    wait_for(3);
    let b = fd.create_job(&[]);
    assert_ne!(a.id, b.id);
    let rec =
        |id: &str| berth::sandbox::JobRecord::load(Path::new("/var/lib/bt/fd-pool"), id).unwrap();
    assert_ne!(
        rec(&a.id).host_id,
        rec(&b.id).host_id,
        "two jobs share a uid range"
    );
    // Each certificate opens its own job only.
    import_busybox_tls(&a);
    assert!(docker_tls_ok(&a, &["images"]).contains("busybox"));
    assert!(!docker_tls_ok(&b, &["images"]).contains("busybox"));
    // A job asking for its own limits gets a fresh sandbox with them.
    wait_for(4);
    let before = dirs();
    let body = r#"{"limits":{"memory_bytes":536870912}}"#;
    let req = format!(
        "POST /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = rt()
        .block_on(tls_request(
            fd.port,
            &fd.certs.join("admin"),
            req.as_bytes(),
        ))
        .unwrap();
    let text = String::from_utf8_lossy(&resp).to_string();
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let custom = v["id"].as_str().unwrap().to_string();
    assert!(
        !before.contains(&custom),
        "a job with its own limits came from the pool"
    );
    let cg = rec(&custom).cgroup.unwrap();
    assert_eq!(cg.memory_limit(), Some(512 << 20));
    eprintln!("warm job handed out in {took:?}");
    drop(fd);
    assert!(dirs().is_empty(), "shutdown left sandboxes: {:?}", dirs());
}

#[test]
fn a_warm_pool_that_cannot_start_says_why_in_job_ls_and_doctor() {
    if !prerequisites() {
        return;
    }
    let mut cfg = engine_config(37, "pool-fails");
    let fake = cfg.state_dir.with_extension("fake-dockerd");
    fake_dockerd(&fake, "fake dockerd: no storage driver works here");
    cfg.dockerd = fake.clone();
    let engine = std::sync::Arc::new(berth::sandbox::Engine::new(cfg).unwrap());
    let fd = FrontDoor::start_engine(engine, "pool-fails", |c| c.warm_pool = 1);
    // The first warm start fails at once; from then on it is retried with
    // a growing wait, and `job ls` tells why the pool is empty.
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        text = out(&fd.job_cli(&["ls"]));
        if text.contains("failed in a row") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        text.contains("warm pool: 0 of 1 ready")
            && text.contains("next try in")
            && text.contains("fake dockerd: no storage driver works here"),
        "{text}"
    );
    // So does doctor, pointed at the running agent.
    let doctor = Command::new(berth_bin())
        .args([
            "doctor",
            "--listen",
            &fd.endpoint(),
            "--state-dir",
            "/var/lib/bt/pool-fails-doctor",
        ])
        .arg("--certs-dir")
        .arg(&fd.certs)
        .output()
        .unwrap();
    let report = out(&doctor);
    let line = report
        .lines()
        .find(|l| l.starts_with("warm pool"))
        .unwrap_or("");
    assert!(
        line.contains("WARN") && line.contains("0 of 1 ready") && report.contains("fake dockerd"),
        "{report}"
    );
    drop(fd);
    let _ = std::fs::remove_file(&fake);
}

/// Sends `raw` over a fresh TLS connection with `bundle`, half-closing
/// when `close` is set, and reads one whole answer (head and its
/// Content-Length body) or until the agent closes.
async fn exchange(port: u16, bundle: &Path, parts: &[&[u8]], close: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = std::fs::read(bundle.join("ca.pem")).unwrap();
    let cert = std::fs::read(bundle.join("cert.pem")).unwrap();
    let key = std::fs::read(bundle.join("key.pem")).unwrap();
    let mut s = tls_connect(port, &ca, Some((&cert, &key))).await.unwrap();
    for p in parts {
        s.write_all(p).await.unwrap();
        s.flush().await.unwrap();
    }
    if close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // A bound on failure only: every case here gets its answer at once or
    // after the (short) body-idle timeout.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer: {}", String::from_utf8_lossy(&out)),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn every_bad_body_and_head_gets_the_clients_4xx_and_the_agent_keeps_serving() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start_with(44, "fd-bodies", |c| {
        c.body_idle_timeout = Duration::from_secs(2)
    });
    let job = fd.create_job(&[]);
    let admin = fd.certs.join("admin");
    let rt = rt();
    let post = |extra: &str| {
        format!(
            "POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    rt.block_on(async {
        // Broken framing of a request body: the client's fault, 400.
        for (what, head, body, close) in [
            ("non-hex chunk size", post("Transfer-Encoding: chunked\r\n"), "zz\r\n{}\r\n0\r\n\r\n", false),
            ("overflowing chunk size", post("Transfer-Encoding: chunked\r\n"), "ffffffffffffffffffffff\r\n{}\r\n0\r\n\r\n", false),
            ("truncated chunked body", post("Transfer-Encoding: chunked\r\n"), "10\r\n{\"Im", true),
            ("fewer bytes than Content-Length", post("Content-Length: 100\r\n"), "{\"Image\":", true),
        ] {
            let r = exchange(fd.port, &job.dir, &[head.as_bytes(), body.as_bytes()], close).await;
            assert!(r.starts_with("HTTP/1.1 400"), "{what}: {r}");
            assert!(r.contains("the request body is malformed"), "{what}: {r}");
        }
        // A body that stops sending is cut after the body-idle timeout (408),
        // on a job's connection and on the job API.
        let r = exchange(
            fd.port,
            &job.dir,
            &[post("Content-Length: 100\r\n").as_bytes(), b"{\"Im"],
            false,
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
        assert!(r.contains("sent nothing for"), "{r}");
        let r = exchange(
            fd.port,
            &admin,
            &[b"POST /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"t"],
            false,
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
        // The same head limit on admin connections as on a job's (431).
        let big = format!(
            "GET /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let r = exchange(fd.port, &admin, &[big.as_bytes()], false).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{}", r.lines().next().unwrap_or(""));
        // The job API takes a JSON object and nothing else.
        for body in ["[]", "\"x\"", "42", "null", "[{\"ttl\": 60}]"] {
            let req = format!(
                "POST /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let r = exchange(fd.port, &admin, &[req.as_bytes()], false).await;
            assert!(r.starts_with("HTTP/1.1 400"), "{body}: {r}");
            assert!(r.contains("expected a JSON object"), "{body}: {r}");
        }
    });
    // No job was made of any of it, and the job still serves.
    let ls = out(&fd.job_cli(&["ls"]));
    assert_eq!(
        ls.lines().filter(|l| l.contains("running")).count(),
        1,
        "{ls}"
    );
    docker_tls_ok(&job, &["version"]);
}

#[test]
fn testcontainers_with_its_defaults_reaches_what_a_job_publishes() {
    if !prerequisites() {
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import testcontainers.core.container"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "testcontainers-python is missing: python3 -m pip install testcontainers==4.15.0"
    );
    // The agent at an address of its host that a remote runner (a network
    // namespace) reaches too; its certificate names every address the
    // host has when it is made, so the link comes first.
    let runner = Outside::create(15);
    let fd = FrontDoor::start_with(15, "fd-testcontainers", |c| {
        c.listen = "10.215.15.1:0".parse().unwrap();
    });
    let job = fd.create_job(&[]);
    assert_eq!(job.endpoint, format!("tcp://{}", fd.endpoint()));
    // The bundle carries the job's own address and its block of ports.
    assert!(
        job.address.parse::<std::net::Ipv4Addr>().is_ok(),
        "{:?}",
        job.address
    );
    let block: berth::sandbox::PortRange = job
        .ports
        .as_deref()
        .expect("job create --json names the job's ports")
        .parse()
        .unwrap();
    import_busybox_tls(&job);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/testcontainers_ports.py");
    // On the agent's host, then on the remote runner: only the three
    // variables docker:dind users set.
    for netns in [None, Some(runner.name.as_str())] {
        let mut c = match netns {
            None => Command::new("python3"),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
        };
        let out = c
            .arg(&script)
            .arg("busybox:test")
            .env("DOCKER_HOST", &job.endpoint)
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", &job.dir)
            // Ports only: tests/inside.rs runs both clients with Ryuk on
            // (its image needs a registry; there it gets a stand-in).
            .env("TESTCONTAINERS_RYUK_DISABLED", "true")
            // requests would trust these bundles instead of DOCKER_CERT_PATH/ca.pem.
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .env_remove("TC_HOST")
            .env_remove("TESTCONTAINERS_HOST_OVERRIDE")
            .output()
            .unwrap();
        let text = format!("{}{}", self::out(&out), err(&out));
        assert!(out.status.success(), "testcontainers ({netns:?}): {text}");
        // It connected where docker:dind users expect: DOCKER_HOST's host,
        // on a port of the job's block.
        assert!(text.contains("host=10.215.15.1 "), "{text}");
        let port: u16 = text
            .split("port=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!(block.contains(port), "{port} is outside {block}");
    }
}

#[test]
fn metrics_and_the_audit_tell_what_every_job_did() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(29, "fd-metrics");
    let job = fd.create_job(&[]);
    import_busybox_tls(&job);
    docker_tls_ok(&job, &["version"]);
    // A hijacked stream (attach) and a response body both ways.
    assert_eq!(
        docker_tls_ok(&job, &["run", "--rm", "busybox:test", "echo", "hi"]).trim(),
        "hi"
    );
    // A denied request: a job's certificate on the job API.
    let denied = rt()
        .block_on(tls_request(
            fd.port,
            &job.dir,
            b"GET /berth/v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ))
        .unwrap();
    assert!(String::from_utf8_lossy(&denied).starts_with("HTTP/1.1 403"));
    // A refused connection: plaintext HTTP on the TLS port.
    {
        use std::io::{Read, Write};
        let mut t = std::net::TcpStream::connect(("127.0.0.1", fd.port)).unwrap();
        t.write_all(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut s = String::new();
        let _ = t.read_to_string(&mut s);
        assert!(s.starts_with("HTTP/1.0 400"), "{s}");
    }

    let m = scrape(&fd);
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&m, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing: {m}"))
    };
    assert_eq!(get("berth_jobs", &[("state", "running")]), 1.0);
    assert!(get("berth_sandbox_starts_total", &[("kind", "job")]) >= 1.0);
    assert!(get("berth_sandbox_ready_seconds_count", &[]) >= 1.0);
    assert!(get("berth_proxy_requests_total", &[("class", "2xx")]) >= 3.0);
    assert!(get("berth_proxy_requests_total", &[("class", "4xx")]) >= 1.0);
    assert!(get("berth_proxy_bytes_total", &[("direction", "to_daemon")]) > 0.0);
    assert!(get("berth_proxy_bytes_total", &[("direction", "to_client")]) > 0.0);
    assert_eq!(
        get("berth_denials_total", &[("rule", "job-api-needs-admin")]),
        1.0
    );
    assert!(
        get(
            "berth_refused_connections_total",
            &[("reason", "plaintext")]
        ) >= 1.0
    );
    assert!(get("berth_resident_memory_bytes", &[]) > 1e6);
    assert!(get("berth_open_connections", &[]) >= 1.0);
    assert!(get("berth_free_id_ranges", &[]) >= 1.0);
    assert!(sample(&m, "berth_warm_pool_size", &[]).is_some());

    // The audit: one record per request, with what it moved and how it
    // was decided; the job's creation first.
    let audit = |id: &str| -> Vec<serde_json::Value> {
        let o = fd.job_cli(&["audit", id, "--json"]);
        assert!(o.status.success(), "{}", err(&o));
        out(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let recs = audit(&job.id);
    assert_eq!(recs[0]["event"], "created");
    assert_eq!(recs[0]["identity"], "admin");
    let find = |recs: &[serde_json::Value], f: &dyn Fn(&serde_json::Value) -> bool| {
        recs.iter()
            .find(|r| f(r))
            .cloned()
            .unwrap_or_else(|| panic!("no such record in {recs:?}"))
    };
    let version = find(&recs, &|r| {
        r["target"]
            .as_str()
            .is_some_and(|t| t.ends_with("/version"))
    });
    assert_eq!(version["status"], 200);
    assert_eq!(version["decision"], "allow");
    assert!(version["bytes_to_client"].as_u64().unwrap() > 0);
    let attach = find(&recs, &|r| {
        r["target"].as_str().is_some_and(|t| t.contains("/attach"))
    });
    assert_eq!(attach["status"], 101);
    assert!(attach["bytes_to_client"].as_u64().unwrap() > 0, "{attach}");
    let import = find(&recs, &|r| {
        r["target"]
            .as_str()
            .is_some_and(|t| t.contains("/images/create"))
    });
    assert!(
        import["bytes_to_daemon"].as_u64().unwrap() > 100_000,
        "{import}"
    );
    let deny = find(&recs, &|r| r["decision"] == "deny");
    assert_eq!(deny["rule"], "job-api-needs-admin");
    assert_eq!(deny["status"], 403);
    assert!(deny["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    // The table for people.
    let table = out(&fd.job_cli(&["audit", &job.id]));
    assert!(table.contains("deny:job-api-needs-admin"), "{table}");
    // Kept after the job ends, with its end.
    let rm = fd.job_cli(&["rm", &job.id]);
    assert!(rm.status.success(), "{}", err(&rm));
    let recs = audit(&job.id);
    let ended = recs.last().unwrap();
    assert_eq!(ended["event"], "ended");
    // With what the job used: at least its dockerd's start.
    assert!(ended["cpu_ms"].as_u64().unwrap() > 0, "{ended}");
    assert!(ended["memory_peak_bytes"].as_u64().unwrap() > 0, "{ended}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(format!("/var/lib/bt/fd-metrics/audit/{}.jsonl", job.id))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let m = scrape(&fd);
    assert!(sample(&m, "berth_jobs", &[("state", "running")]).is_none());
    assert!(sample(&m, "berth_teardown_seconds_count", &[]).unwrap() >= 1.0);
    assert!(sample(&m, "berth_job_cpu_seconds_count", &[]).unwrap() >= 1.0);
    assert!(sample(&m, "berth_job_cpu_seconds_sum", &[]).unwrap() > 0.0);
    assert!(sample(&m, "berth_job_memory_peak_bytes_count", &[]).unwrap() >= 1.0);
    // Another job's certificate reads no audit (the job API is the admin's).
    let other = fd.create_job(&[]);
    let r = rt()
        .block_on(tls_request(
            fd.port,
            &other.dir,
            format!(
                "GET /berth/v1/jobs/{}/audit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                job.id
            )
            .as_bytes(),
        ))
        .unwrap();
    assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 403"));
}

#[test]
fn a_strict_policy_denies_what_reaches_past_the_container_and_the_cli_says_why() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start_with(38, "fd-policy", |c| {
        c.policy = berth::frontdoor::policy::Policy {
            profile: berth::frontdoor::policy::Profile::Strict,
            allowed_bind_sources: vec!["/tmp/shared".into()],
            allowed_capabilities: vec!["NET_ADMIN".into()],
            allowed_registries: vec!["docker.io".into()],
            max_body_bytes: 64 * 1024,
        }
    });
    let job = fd.create_job(&[]);
    import_busybox_tls(&job);
    let denied = |args: &[&str], rule: &str| {
        let o = docker_tls(&job, args);
        let e = err(&o);
        assert!(!o.status.success(), "{args:?} was let through");
        assert!(
            e.contains("denied by this agent's policy") && e.contains(rule),
            "{args:?}: {e}"
        );
    };
    let run = |flags: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["run".into(), "--rm".into()];
        v.extend(flags.iter().map(|s| s.to_string()));
        v.extend(["busybox:test".into(), "true".into()]);
        v
    };
    for (flags, rule) in [
        (&["--privileged"][..], "privileged"),
        (&["-v", "/:/host"], "bind-mount"),
        (
            &["--mount", "type=bind,source=/etc,target=/e"],
            "bind-mount",
        ),
        (&["--pid", "host"], "host-pid"),
        (&["--ipc", "host"], "host-ipc"),
        (&["--uts", "host"], "host-uts"),
        (&["--network", "host"], "host-network"),
        (&["--userns", "host"], "host-userns"),
        (&["--cap-add", "SYS_ADMIN"], "cap-add"),
        (&["--security-opt", "seccomp=unconfined"], "unconfined"),
        (&["--security-opt", "apparmor=unconfined"], "unconfined"),
        (&["--device", "/dev/null:/dev/x"], "devices"),
    ] {
        let args = run(flags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        denied(&args, rule);
    }
    denied(&["pull", "quay.io/team/tool:1"], "registry");
    // What stays inside the job is let through.
    for flags in [
        &["-v", "data:/data"][..],
        &["-v", "/tmp/shared/cache:/cache"],
        &["--cap-add", "NET_ADMIN"],
        &["--tmpfs", "/scratch"],
    ] {
        let args = run(flags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_tls_ok(&job, &args);
    }
    docker_tls_ok(
        &job,
        &[
            "run",
            "-d",
            "--name",
            "sleeper",
            "busybox:test",
            "sleep",
            "600",
        ],
    );
    denied(&["exec", "--privileged", "sleeper", "true"], "privileged");
    docker_tls_ok(&job, &["exec", "sleeper", "true"]);
    // A body past the bound is denied, not read without end.
    let big = format!(
        "{{\"Image\":\"busybox:test\",\"Env\":[\"X={}\"]}}",
        "a".repeat(70 * 1024)
    );
    let req = format!(
        "POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
        big.len()
    );
    let r = rt()
        .block_on(tls_request(fd.port, &job.dir, req.as_bytes()))
        .unwrap();
    assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 413"));
    // Every denial is counted and audited.
    let audit = out(&fd.job_cli(&["audit", &job.id, "--json"]));
    let denials: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["decision"] == "deny")
        .collect();
    assert_eq!(denials.len(), 15, "{audit}");
    assert!(
        denials
            .iter()
            .any(|r| r["rule"] == "bind-mount" && r["status"] == 403)
    );
    let m = scrape(&fd);
    assert_eq!(
        sample(&m, "berth_denials_total", &[("rule", "bind-mount")]),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "berth_denials_total", &[("rule", "body-too-large")]),
        Some(1.0)
    );
}

#[test]
fn an_ended_job_leaves_no_task_behind_on_the_agent() {
    if !prerequisites() {
        return;
    }
    let fd = FrontDoor::start(98, "fd-tasks");
    let tasks = || sample(&scrape(&fd), "berth_tasks", &[]).expect("berth_tasks") as i64;
    // One job made and ended first, so that whatever the first job starts
    // once (and keeps) is in the baseline.
    let warm = fd.create_job(&["--ttl", "2h"]);
    assert!(fd.job_cli(&["rm", &warm.id]).status.success());
    let before = tasks();
    for _ in 0..6 {
        // A long ttl: its timer would outlive the job by two hours.
        let j = fd.create_job(&["--ttl", "2h"]);
        let rm = fd.job_cli(&["rm", &j.id]);
        assert!(rm.status.success(), "{}", err(&rm));
    }
    // Tasks of a teardown may finish a moment after its answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = tasks();
        if now <= before + 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "six jobs came and went, and the agent's tasks went from {before} to {now}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn capacity_says_whether_the_agent_takes_another_job() {
    if !prerequisites() {
        return;
    }
    let mut cfg = engine_config(39, "fd-capacity");
    cfg.uid_ranges = 2;
    let engine = std::sync::Arc::new(berth::sandbox::Engine::new(cfg).unwrap());
    let fd = FrontDoor::start_engine(engine, "fd-capacity", |_| {});
    let capacity = |endpoint: &str, args: &[&str]| {
        Command::new(berth_bin())
            .arg("capacity")
            .args(args)
            .args(["--endpoint", endpoint])
            .arg("--certs-dir")
            .arg(&fd.certs)
            .output()
            .unwrap()
    };
    let asked = |args: &[&str]| capacity(&fd.endpoint(), args);
    let json = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(o)))
    };

    let o = asked(&["--json", "--min-free", "2"]);
    assert_eq!(o.status.code(), Some(0), "{} {}", out(&o), err(&o));
    let v = json(&o);
    assert_eq!(
        (&v["free"], &v["free_ranges"], &v["uid_ranges"], &v["jobs"]),
        (&2.into(), &2.into(), &2.into(), &0.into()),
        "{v}"
    );
    assert_eq!(v["accepting"], true, "{v}");
    assert!(v["memory_available_bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(asked(&["--min-free", "3"]).status.code(), Some(1));
    let o = asked(&["--min-memory-bytes", &u64::MAX.to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("MiB asked"), "{}", out(&o));

    let a = fd.create_job(&[]);
    let _b = fd.create_job(&[]);
    let o = asked(&["--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let v = json(&o);
    assert_eq!((&v["free"], &v["jobs"]), (&0.into(), &2.into()), "{v}");
    assert_eq!(v["accepting"], false, "{v}");
    // What bounds the count: the two id ranges, then the host's memory,
    // tasks and the agent's descriptors, each counting the two jobs.
    let bounds = v["bounds"].as_array().expect("bounds");
    let bound = |name: &str| {
        bounds
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no {name} bound: {v}"))
    };
    assert_eq!(bounds[0]["name"], "slots", "the tightest first: {v}");
    assert_eq!(bound("slots")["jobs"], 2, "{v}");
    assert!(
        bound("slots")["detail"]
            .as_str()
            .unwrap()
            .contains("uid_ranges"),
        "{v}"
    );
    for name in ["memory", "tasks", "agent_fds"] {
        assert!(bound(name)["jobs"].as_u64().unwrap() >= 2, "{v}");
    }
    // The kernel's bounds on what a job does, as the host's sysctls read:
    // with jobs running, connection tracking is loaded for their NAT.
    let limits = v["limits"].as_array().expect("limits");
    let limit = |name: &str| {
        limits
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no {name} limit: {v}"))
    };
    let sysctl = |p: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/sys/{p}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    for (name, p) in [
        ("inotify_instances", "fs/inotify/max_user_instances"),
        ("inotify_watches", "fs/inotify/max_user_watches"),
        ("keys", "kernel/keys/maxkeys"),
        ("key_bytes", "kernel/keys/maxbytes"),
        ("conntrack", "net/netfilter/nf_conntrack_max"),
    ] {
        assert_eq!(limit(name)["max"], sysctl(p), "{name}: {v}");
    }
    assert!(limit("conntrack")["in_use"].is_u64(), "{v}");
    assert!(
        limit("keys")["detail"]
            .as_str()
            .unwrap()
            .contains("containers"),
        "{v}"
    );
    let said = out(&asked(&[]));
    assert!(said.starts_with("full"), "{said}");
    assert!(said.contains("at most 2 jobs by slots"), "{said}");
    assert!(said.contains("\n  keys: "), "{said}");

    let rm = fd.job_cli(&["rm", &a.id]);
    assert!(rm.status.success(), "{}", err(&rm));
    let o = asked(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).starts_with("accepting: 1 free"), "{}", out(&o));

    // An agent that cannot be asked is neither ready nor full.
    let o = capacity("127.0.0.1:9", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("127.0.0.1:9"), "{}", err(&o));
}

#[test]
fn the_token_exchange_grants_jobs_to_verified_workload_identities_only() {
    if !prerequisites() {
        return;
    }
    const ISS: &str = "https://ci.example.test";
    let keys_dir = PathBuf::from("/var/lib/bt/fd-token-keys");
    let _ = std::fs::remove_dir_all(&keys_dir);
    std::fs::create_dir_all(&keys_dir).unwrap();
    let rsa = test_key(&keys_dir, jsonwebtoken::Algorithm::RS256, "rsa-1");
    let ec = test_key(&keys_dir, jsonwebtoken::Algorithm::ES256, "ec-1");
    let jwks = keys_dir.join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [jwk(&rsa), jwk(&ec)] }).to_string(),
    )
    .unwrap();
    let token_cfg: berth::oidc::TokenConfig = toml::from_str(&format!(
        r#"
enabled = true
listen = "127.0.0.1:0"
[[issuers]]
issuer = "{ISS}"
jwks_file = {jwks:?}
[[rules]]
name = "acme-main"
issuer = "{ISS}"
claims = {{ repository = "acme/*", ref = "refs/heads/main" }}
labels = ["repository", "run_id"]
max_ttl = "1h"
workspaces = ["/var/lib/bt-ws/token/acme/*"]
"#
    ))
    .unwrap();
    // Workspaces the rule's pattern names, below the agent's allowed root.
    let ws_root = PathBuf::from("/var/lib/bt-ws/token");
    let _ = std::fs::remove_dir_all(&ws_root);
    for d in ["acme/app", "other/app"] {
        let d = ws_root.join(d);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(4242), Some(4343)).unwrap();
    }
    let engine = berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
        workspaces: berth::sandbox::fs::workspaces::WorkspacesConfig {
            allowed_roots: vec![ws_root.clone()],
        },
        ..engine_config(43, "fd-token")
    })
    .unwrap();
    let fd = FrontDoor::start_engine(std::sync::Arc::new(engine), "fd-token", |c| {
        c.token = token_cfg
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let jti = std::sync::atomic::AtomicU32::new(0);
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({
            "iss": ISS, "aud": "berth", "sub": "repo:acme/app:ref:refs/heads/main",
            "repository": "acme/app", "ref": "refs/heads/main", "run_id": 4711,
            "iat": now, "exp": now + 600,
            "jti": format!("jti-{}", jti.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        });
        f(&mut c);
        c
    };
    let n = std::sync::atomic::AtomicU32::new(0);
    let exchange = |jwt: &str, extra: &[&str]| {
        let f = keys_dir.join(format!(
            "t{}",
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&f, jwt).unwrap();
        fd.create_with_token(&f, extra)
    };
    let refused = |jwt: &str, status: &str, says: &str| {
        let o = exchange(jwt, &[]);
        assert!(!o.status.success(), "a bad token got a job: {}", out(&o));
        let e = err(&o);
        assert!(
            e.contains(status) && e.contains(says),
            "want {status} {says:?}: {e}"
        );
    };

    // A good RS256 token: a job whose certificate opens its daemon, labelled
    // from the token's claims.
    let good = mint(&rsa, &claims(&|_| {}));
    let o = exchange(&good, &[]);
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let job = TlsJob::from_create_json(&v, PathBuf::from(v["cert_path"].as_str().unwrap()));
    assert!(
        job.endpoint.ends_with(&format!(":{}", fd.port)),
        "{}",
        job.endpoint
    );
    docker_tls_ok(&job, &["version"]);
    let ls = out(&fd.job_cli(&["ls", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job.id.as_str())
        .unwrap_or_else(|| panic!("{ls}"));
    assert_eq!(mine["labels"]["oidc.repository"], "acme/app", "{mine}");
    assert_eq!(mine["labels"]["oidc.run_id"], "4711", "{mine}");
    assert_eq!(mine["labels"]["berth.rule"], "acme-main", "{mine}");
    // A workspace the rule's pattern names; one it does not (nor one that
    // climbs out of it) is refused before the token is spent.
    let acme = ws_root.join("acme/app").display().to_string();
    let o = exchange(&mint(&rsa, &claims(&|_| {})), &["--workspace", &acme]);
    assert!(o.status.success(), "{}", err(&o));
    for other in [
        ws_root.join("other/app").display().to_string(),
        format!("{}/acme/../other/app", ws_root.display()),
    ] {
        let o = exchange(&mint(&rsa, &claims(&|_| {})), &["--workspace", &other]);
        assert!(
            err(&o).contains("403") && err(&o).contains("not one that rule acme-main grants"),
            "{other}: {}",
            err(&o)
        );
    }
    // ES256 works too, and a job longer than the rule grants is refused.
    let o = exchange(&mint(&ec, &claims(&|_| {})), &["--ttl", "30m"]);
    assert!(o.status.success(), "{}", err(&o));
    let o = exchange(&mint(&ec, &claims(&|_| {})), &["--ttl", "2h"]);
    assert!(
        err(&o).contains("400") && err(&o).contains("acme-main"),
        "{}",
        err(&o)
    );

    // Every bad token: refused with a clear 401/403.
    refused(&good, "401", "used before");
    refused(
        &mint(&rsa, &claims(&|c| c["exp"] = (now - 3600).into())),
        "401",
        "expired",
    );
    refused(
        &mint(&rsa, &claims(&|c| c["aud"] = "other".into())),
        "401",
        "audience",
    );
    refused(
        &mint(&rsa, &claims(&|c| c["iss"] = "https://evil.test".into())),
        "401",
        "issuer",
    );
    refused(
        &mint(&rsa, &claims(&|c| c["repository"] = "evil/app".into())),
        "403",
        "no rule",
    );
    refused(
        &mint(&rsa, &claims(&|c| c["ref"] = "refs/heads/dev".into())),
        "403",
        "no rule",
    );
    // Unsigned: {"alg":"none","typ":"JWT"} over good claims, no signature.
    let body = mint(&rsa, &claims(&|_| {}));
    let payload = body.split('.').nth(1).unwrap();
    refused(
        &format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."),
        "401",
        "not a JWT",
    );
    // Key confusion: HS256 "signed" with the issuer's public RSA key.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &h,
        &claims(&|_| {}),
        &jsonwebtoken::EncodingKey::from_secret(&rsa.public_pem),
    )
    .unwrap();
    refused(&confused, "401", "HS256");
    // Another payload under a good signature.
    let signed = mint(&rsa, &claims(&|_| {}));
    let other = mint(&rsa, &claims(&|c| c["repository"] = "acme/other".into()));
    let parts: Vec<&str> = signed.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    refused(&forged, "401", "signature");
    // A key the issuer never published.
    let elsewhere = keys_dir.join("stranger");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let stranger = test_key(&elsewhere, jsonwebtoken::Algorithm::ES256, "ec-9");
    refused(&mint(&stranger, &claims(&|_| {})), "401", "no key");

    // Every exchange is in the audit, with its rule.
    let audit = out(&fd.job_cli(&["audit", "tokens", "--json"]));
    for rule in [
        "acme-main",
        "token-replayed",
        "token-expired",
        "token-audience",
        "token-issuer",
        "token-no-rule",
        "token-malformed",
        "token-algorithm",
        "token-signature",
        "token-key",
    ] {
        assert!(
            audit.contains(&format!("\"rule\":\"{rule}\"")),
            "{rule}: {audit}"
        );
    }
    // The job's own audit names the token's rule and subject.
    let own = out(&fd.job_cli(&["audit", &job.id, "--json"]));
    assert!(own.contains("rule=acme-main sub=repo:acme/app"), "{own}");
    // The token listener serves nothing else.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(fd.certs.join("ca/cert.pem")).unwrap())
        .unwrap();
    let status = rt().block_on(async {
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .build()
            .unwrap()
            .post(format!(
                "https://localhost:{}/berth/v1/jobs",
                fd.token.unwrap().port()
            ))
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 404);
}
