//! BuildKit, buildx and compose v2 through the front door, with the real
//! docker CLI and its Debian 13 plugins (docker-buildx, docker-compose), on
//! every supported engine: the host's own dockerd (Debian 12's 20.10 here,
//! Debian 13's 26.1 in the trixie guest) and Debian 13's engine unpacked
//! into /opt (`scripts/debian13-parts engine`). Builds use the CLI's default
//! (BuildKit); only compose v1, which drives the legacy builder itself,
//! builds without it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::frontdoor::policy::{Policy, Profile};
use berth::sandbox::{ImageStore, SandboxConfig};
use common::*;

#[derive(Clone, Copy, Debug)]
enum EngineKind {
    /// The host's /usr/sbin/dockerd (Debian's docker.io).
    System,
    /// Debian 13's dockerd and containerd from /opt, the host's runc.
    Debian13,
}

fn config(kind: EngineKind, n: u32, name: &str) -> SandboxConfig {
    match kind {
        EngineKind::System => engine_config(n, name),
        EngineKind::Debian13 => with_debian13_engine(engine_config(n, name)),
    }
}

/// Fails loudly without the CLI plugins every build here relies on.
fn plugins() {
    for p in ["buildx", "compose"] {
        let o = Command::new("docker")
            .args([p, "version"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "the docker CLI has no {p} plugin: run scripts/debian13-parts plugins ({})",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The docker CLI for a job over mutual TLS, with a docker config dir of
/// its own (buildx keeps its builder state there).
fn cli(job: &TlsJob, config: &Path) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", &job.endpoint)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &job.dir)
        .env("DOCKER_CONFIG", config)
        .env_remove("DOCKER_BUILDKIT")
        .env_remove("BUILDKIT_PROGRESS")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null());
    c
}

/// Runs `c` and returns its output, panicking with both streams when it
/// fails.
fn run(what: &str, c: &mut Command) -> Output {
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        o.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A fresh work directory for one test.
fn workdir(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/var/lib/bt/{name}-work"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `ssh_agent_keys`, a static program that asks an ssh-agent how many keys
/// it holds: a busybox image has no ssh client to show that a build step
/// reached the client's agent.
fn ssh_agent_keys(into: &Path) {
    // Built on the host where the tests run without a compiler (the
    // guest lanes).
    if let Some(built) = std::env::var_os("BERTH_TEST_SSH_AGENT_KEYS") {
        std::fs::copy(&built, into).unwrap_or_else(|e| {
            panic!(
                "BERTH_TEST_SSH_AGENT_KEYS={}: {e}",
                Path::new(&built).display()
            )
        });
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ssh_agent_keys.c");
    let o = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(into)
        .arg(&src)
        .output()
        .expect("gcc is missing: apt-get install gcc libc6-dev");
    assert!(o.status.success(), "gcc: {}", text(&o.stderr));
}

/// An ssh-agent of the test's own holding one new key; killed on drop.
struct SshAgent {
    sock: PathBuf,
    pid: String,
}

impl SshAgent {
    fn start(dir: &Path) -> SshAgent {
        let sock = dir.join("agent.sock");
        let o = Command::new("ssh-agent")
            .arg("-a")
            .arg(&sock)
            .arg("-s")
            .output()
            .expect("ssh-agent is missing: apt-get install openssh-client");
        assert!(o.status.success(), "ssh-agent: {}", text(&o.stderr));
        let pid = text(&o.stdout)
            .split(';')
            .find_map(|p| p.trim().strip_prefix("SSH_AGENT_PID=").map(String::from))
            .expect("ssh-agent printed its pid");
        let key = dir.join("id_ed25519");
        run(
            "ssh-keygen",
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key),
        );
        run(
            "ssh-add",
            Command::new("ssh-add")
                .arg(&key)
                .env("SSH_AUTH_SOCK", &sock),
        );
        SshAgent { sock, pid }
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

/// The build context every scenario uses: a multi-stage Dockerfile whose
/// stages exercise one BuildKit feature each. No `# syntax=` line: that
/// would pull a frontend image from Docker Hub.
fn write_context(dir: &Path) {
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    std::fs::write(dir.join("extra/hello.txt"), "from another context\n").unwrap();
    ssh_agent_keys(&dir.join("ssh_agent_keys"));
    std::fs::write(
        dir.join("Dockerfile"),
        r#"FROM busybox:test AS base
ARG GREETING=unset
RUN echo "$GREETING" > /greeting

FROM base AS tools
RUN echo tool > /tool

FROM base AS cached
ARG ROUND
RUN --mount=type=cache,target=/cache sh -c 'n=$(cat /cache/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /cache/n; echo $n > /runs'

FROM base AS secret
RUN --mount=type=secret,id=token,required=true --mount=type=secret,id=envtok,required=true \
    sh -c 'sha256sum /run/secrets/token | cut -c1-64 > /token.sha; sha256sum /run/secrets/envtok | cut -c1-64 > /envtok.sha'

FROM base AS ssh
COPY ssh_agent_keys /ssh_agent_keys
RUN --mount=type=ssh,required=true /ssh_agent_keys > /ssh-keys

FROM base AS bound
RUN --mount=type=bind,from=tools,source=/tool,target=/mnt/tool cat /mnt/tool > /bound

FROM base AS contexts
COPY --from=extra hello.txt /extra.txt

FROM base AS app
COPY --from=tools /tool /tool
CMD ["cat", "/greeting"]
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("docker-bake.hcl"),
        r#"group "default" {
  targets = ["tools", "app"]
}
target "tools" {
  context = "."
  target = "tools"
  tags = ["bake-tools:1"]
}
target "app" {
  context = "."
  target = "app"
  tags = ["bake-app:1"]
  args = { GREETING = "baked" }
}
"#,
    )
    .unwrap();
}

fn import_base(job: &TlsJob, config: &Path) {
    let mut c = cli(job, config);
    c.args(["import", "--change", "ENV PATH=/bin", "-", "busybox:test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(busybox_tar())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "import: {}", text(&o.stderr));
}

/// A job through a front door with what every scenario needs beside it: a
/// work directory of its own, a docker config directory (buildx keeps its
/// builder state there) and the base image imported.
struct JobWork {
    fd: FrontDoor,
    job: TlsJob,
    work: PathBuf,
    config: PathBuf,
}

impl JobWork {
    fn open(fd: FrontDoor, name: &str) -> JobWork {
        let job = fd.create_job(&[]);
        let work = workdir(name);
        let config = work.join("docker-config");
        std::fs::create_dir_all(&config).unwrap();
        import_base(&job, &config);
        JobWork {
            fd,
            job,
            work,
            config,
        }
    }

    fn cli(&self) -> Command {
        cli(&self.job, &self.config)
    }

    /// `docker run --rm IMAGE cat FILE` in the job.
    fn cat(&self, image: &str, file: &str) -> String {
        text(
            &run(
                &format!("cat {file} in {image}"),
                self.cli().args(["run", "--rm", image, "cat", file]),
            )
            .stdout,
        )
        .trim()
        .to_string()
    }

    /// `berth job rm`, and nothing of the job left in `name`'s state dir.
    fn remove(&self, name: &str) {
        let o = self.fd.job_cli(&["rm", &self.job.id]);
        assert!(o.status.success(), "job rm: {}", text(&o.stderr));
        assert!(jobs_left(name).is_empty(), "{:?}", jobs_left(name));
    }
}

/// Every build scenario of a CI job, against one job, in order. `registry`
/// is a TLS registry whose CA the job's dockerd has.
fn build_scenarios(jw: &JobWork, registry: &str) {
    let work = &jw.work;
    let ctx = work.join("ctx");
    write_context(&ctx);
    let c = || {
        let mut c = jw.cli();
        c.current_dir(&ctx);
        c
    };

    // The CLI's default `docker build` is BuildKit (buildx), with the flags
    // CI scripts pass.
    let iid = work.join("iid");
    let meta = work.join("metadata.json");
    let o = run(
        "docker build",
        c().args(["build", "-t", "app:1", "--target", "app"])
            .args(["--build-arg", "GREETING=hello"])
            .arg("--iidfile")
            .arg(&iid)
            .arg("--metadata-file")
            .arg(&meta)
            .args(["--progress=plain", "."]),
    );
    let log = text(&o.stderr);
    assert!(
        log.contains("[internal] load build definition from Dockerfile"),
        "not a BuildKit build:\n{log}"
    );
    assert_eq!(jw.cat("app:1", "/greeting"), "hello");
    assert_eq!(jw.cat("app:1", "/tool"), "tool");
    let id = text(
        &run(
            "inspect",
            c().args(["image", "inspect", "-f", "{{.Id}}", "app:1"]),
        )
        .stdout,
    );
    assert_eq!(
        std::fs::read_to_string(&iid).unwrap().trim(),
        id.trim(),
        "--iidfile"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).unwrap()).expect("--metadata-file is JSON");
    assert!(
        m.get("containerimage.config.digest").is_some() || m.get("containerimage.digest").is_some(),
        "--metadata-file: {m}"
    );

    // buildx build --load, progress as raw JSON.
    let o = run(
        "buildx build --load",
        c().args([
            "buildx", "build", "--load", "-t", "tools:1", "--target", "tools",
        ])
        .args(["--progress=rawjson", "."]),
    );
    let raw = text(&o.stderr);
    let json_lines = raw
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    assert!(json_lines > 0, "--progress=rawjson printed no JSON:\n{raw}");
    assert_eq!(jw.cat("tools:1", "/tool"), "tool");

    // A cache mount outlives the build: the second run of the step (its
    // layer cache busted by a new build arg, as a changed source would)
    // finds what the first left.
    for round in ["1", "2"] {
        run(
            "build with a cache mount",
            c().args(["build", "-t", "cached:1", "--target", "cached"])
                .args(["--build-arg", &format!("ROUND={round}"), "."]),
        );
        assert_eq!(jw.cat("cached:1", "/runs"), round, "cache mount");
    }

    // Secrets from a file and from the environment reach the step, and
    // only as files under /run/secrets.
    let secret = "berth-test-secret-file-7f3a";
    let env_secret = "berth-test-secret-env-91cd";
    let secret_file = work.join("token");
    std::fs::write(&secret_file, secret).unwrap();
    run(
        "build with secrets",
        c().args(["build", "-t", "secret:1", "--target", "secret"])
            .arg("--secret")
            .arg(format!("id=token,src={}", secret_file.display()))
            .args(["--secret", "id=envtok,env=BERTH_TEST_ENV_SECRET"])
            .env("BERTH_TEST_ENV_SECRET", env_secret)
            .arg("."),
    );
    assert_eq!(
        jw.cat("secret:1", "/token.sha"),
        sha256_hex(secret.as_bytes())
    );
    assert_eq!(
        jw.cat("secret:1", "/envtok.sha"),
        sha256_hex(env_secret.as_bytes())
    );
    assert_no_secret_in_image(jw, "secret:1", &[secret, env_secret]);

    // The client's ssh-agent, forwarded into the step.
    let agent = SshAgent::start(work);
    run(
        "build with --ssh default",
        c().args([
            "build", "-t", "ssh:1", "--target", "ssh", "--ssh", "default",
        ])
        .env("SSH_AUTH_SOCK", &agent.sock)
        .arg("."),
    );
    assert_eq!(
        jw.cat("ssh:1", "/ssh-keys"),
        "1",
        "the step saw the agent's key"
    );
    drop(agent);

    // A bind mount from another stage, and a second build context.
    run(
        "build with a bind mount from a stage",
        c().args(["build", "-t", "bound:1", "--target", "bound", "."]),
    );
    assert_eq!(jw.cat("bound:1", "/bound"), "tool");
    // Named build contexts need Dockerfile frontend 1.4 (BuildKit 0.10,
    // dockerd 23 on); 20.10's own frontend refuses them by name, as it does
    // in docker:dind.
    let server = text(
        &run(
            "docker version",
            c().args(["version", "-f", "{{.Server.Version}}"]),
        )
        .stdout,
    );
    let major: u32 = server.split('.').next().unwrap().trim().parse().unwrap();
    let mut named = c();
    named
        .args(["build", "-t", "contexts:1", "--target", "contexts"])
        .args(["--build-context", "extra=extra", "."]);
    if major >= 23 {
        run("build with --build-context", &mut named);
        assert_eq!(jw.cat("contexts:1", "/extra.txt"), "from another context");
    } else {
        let o = named.output().unwrap();
        assert!(
            !o.status.success()
                && text(&o.stderr)
                    .contains("unsupported frontend capability moby.buildkit.frontend.contexts"),
            "dockerd {server}: --build-context: {}",
            text(&o.stderr)
        );
    }

    // Exporters that write on the client.
    let out = work.join("out");
    run(
        "--output type=local",
        c().args(["build", "--target", "tools", "--output"])
            .arg(format!("type=local,dest={}", out.display()))
            .arg("."),
    );
    assert_eq!(
        std::fs::read_to_string(out.join("tool")).unwrap().trim(),
        "tool"
    );
    let tar = work.join("out.tar");
    run(
        "--output type=tar",
        c().args(["build", "--target", "tools", "--output"])
            .arg(format!("type=tar,dest={}", tar.display()))
            .arg("."),
    );
    let listing = run("tar -tf", Command::new("tar").arg("-tf").arg(&tar));
    assert!(
        text(&listing.stdout).lines().any(|l| l == "tool"),
        "the tar export lacks /tool"
    );

    // Push to a registry, and a build cache carried in an image there.
    let pushed = format!("{registry}/berth/app:1");
    run(
        "build --push",
        c().args([
            "buildx", "build", "--push", "--target", "app", "-t", &pushed, ".",
        ]),
    );
    run("rmi", c().args(["rmi", "-f", &pushed]));
    run("pull what was pushed", c().args(["pull", &pushed]));
    assert_eq!(jw.cat(&pushed, "/tool"), "tool");
    let cache_ref = format!("{registry}/berth/cache:1");
    run(
        "build --cache-to type=inline --push",
        c().args(["buildx", "build", "--push", "--target", "tools"])
            .args(["--cache-to", "type=inline", "-t", &cache_ref])
            .args(["--build-arg", "GREETING=inline", "."]),
    );
    run("rmi", c().args(["rmi", "-f", &cache_ref]));
    run("builder prune", c().args(["builder", "prune", "-af"]));
    let o = run(
        "build --cache-from",
        c().args([
            "build",
            "--progress=plain",
            "-t",
            "fromcache:1",
            "--target",
            "tools",
        ])
        .args(["--cache-from", &cache_ref])
        .args(["--build-arg", "GREETING=inline", "."]),
    );
    let log = text(&o.stderr);
    // `#N [tools 1/1] RUN …` and, for the same N, `#N CACHED`.
    let step = log
        .lines()
        .find(|l| l.contains("RUN echo tool > /tool"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no RUN step in the log:\n{log}"));
    assert!(
        log.contains(&format!("importing cache manifest from {cache_ref}"))
            && log.lines().any(|l| l.trim() == format!("{step} CACHED")),
        "the step did not come from the registry's cache:\n{log}"
    );

    // bake: two targets from an HCL file.
    run("buildx bake", c().args(["buildx", "bake", "--load"]));
    assert_eq!(jw.cat("bake-app:1", "/greeting"), "baked");
    assert_eq!(jw.cat("bake-tools:1", "/tool"), "tool");

    // Disk usage and pruning of the build cache.
    let du = run("buildx du", c().args(["buildx", "du"]));
    assert!(
        text(&du.stdout).contains("Total:"),
        "buildx du: {}",
        text(&du.stdout)
    );
    run("system df", c().args(["system", "df"]));
    run("buildx prune", c().args(["buildx", "prune", "-af"]));
    run("builder prune", c().args(["builder", "prune", "-af"]));
    let du = text(&run("buildx du after prune", c().args(["buildx", "du"])).stdout);
    assert!(
        !du.lines().any(|l| l.contains("mount / from exec")),
        "the cache mount survived the prune:\n{du}"
    );
}

/// Neither the image's history and config nor any of its layers holds the
/// secrets.
fn assert_no_secret_in_image(jw: &JobWork, image: &str, secrets: &[&str]) {
    let history = run("history", jw.cli().args(["history", "--no-trunc", image]));
    let inspect = run("inspect", jw.cli().args(["image", "inspect", image]));
    let saved = run("save", jw.cli().args(["save", image]));
    for s in secrets {
        for (what, bytes) in [
            ("history", &history.stdout),
            ("inspect", &inspect.stdout),
            ("save", &saved.stdout),
        ] {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "the secret is in the image's {what}"
            );
        }
    }
}

/// A front door over `kind`'s engine whose jobs trust a registry in a test
/// host through a private CA (`[registries.ca]`, as CI registries usually
/// are), and that registry.
fn door_with_registry(
    kind: EngineKind,
    n: u32,
    name: &str,
    policy: Policy,
) -> (FrontDoor, Outside, Registry, String) {
    let (fd, host, registry, addr, _) =
        door_with_registry_store(kind, n, name, policy, ImageStore::Classic);
    (fd, host, registry, addr)
}

/// [`door_with_registry`] with jobs on `store`; also the registry's CA file.
fn door_with_registry_store(
    kind: EngineKind,
    n: u32,
    name: &str,
    policy: Policy,
    store: ImageStore,
) -> (FrontDoor, Outside, Registry, String, PathBuf) {
    let host = Outside::create(n as u8);
    let ip = host.addr.to_string();
    let (ca_pem, cert_pem, key_pem) = private_ca_for(&ip);
    let ca_file = PathBuf::from(format!("/var/lib/bt/{name}-registry-ca.pem"));
    std::fs::create_dir_all("/var/lib/bt").unwrap();
    std::fs::write(&ca_file, ca_pem).unwrap();
    let addr = format!("{ip}:5443");
    let registry = Registry::start(&host.name, name, &addr, Some((&cert_pem, &key_pem)), None);
    let cfg = SandboxConfig {
        registries: berth::images::registries::Registries {
            ca: [(addr.clone(), ca_file.clone())].into(),
            ..Default::default()
        },
        image_store: store,
        ..config(kind, n, name)
    };
    let engine = Arc::new(berth::sandbox::Engine::new(cfg).expect("engine"));
    let fd = FrontDoor::start_engine(engine, name, |c| c.policy = policy);
    (fd, host, registry, addr, ca_file)
}

fn strict() -> Policy {
    Policy {
        profile: Profile::Strict,
        ..Policy::default()
    }
}

fn build_test(kind: EngineKind, n: u32, name: &str, policy: Policy) {
    if !prerequisites() {
        return;
    }
    plugins();
    let host_binds = matches!(policy.profile, Profile::AllowAll);
    let (fd, _host, registry, addr) = door_with_registry(kind, n, name, policy);
    let jw = JobWork::open(fd, name);
    if host_binds && matches!(kind, EngineKind::Debian13) {
        // The engine from /opt is in the job's root, and nothing else of
        // the host's /opt: its directories, read-only.
        let seen = run(
            "the engine in the job's root",
            jw.cli().args([
                "run",
                "--rm",
                "-v",
                "/:/host",
                "busybox:test",
                "sh",
                "-c",
                "ls /host/opt/berth/engines/debian13/usr; ls -A /host/opt /host/opt/berth/engines; \
                 touch /host/opt/berth/engines/debian13/usr/sbin/x 2>&1 || true",
            ]),
        );
        assert_eq!(
            text(&seen.stdout),
            "bin\nsbin\n/host/opt:\nberth\ncontainerd\n\n/host/opt/berth/engines:\ndebian13\n\
             touch: /host/opt/berth/engines/debian13/usr/sbin/x: Read-only file system\n"
        );
    }
    build_scenarios(&jw, &addr);
    assert!(
        registry.log_count("\"PUT /v2/berth/app/manifests/1") >= 1,
        "the registry saw no push"
    );
    jw.remove(name);
}

#[test]
fn buildkit_builds_through_the_front_door_on_the_system_engine() {
    build_test(EngineKind::System, 46, "bk-sys", Policy::default());
}

#[test]
fn buildkit_builds_under_the_strict_policy_on_the_system_engine() {
    build_test(EngineKind::System, 47, "bk-sys-strict", strict());
}

#[test]
fn buildkit_builds_through_the_front_door_on_the_debian13_engine() {
    build_test(EngineKind::Debian13, 48, "bk-d13", Policy::default());
}

#[test]
fn buildkit_builds_under_the_strict_policy_on_the_debian13_engine() {
    build_test(EngineKind::Debian13, 49, "bk-d13-strict", strict());
}

/// A compose project as CI jobs write them: a service built from a
/// Dockerfile that waits for a healthy database, a named volume, a profile.
fn write_compose_project(dir: &Path) {
    std::fs::create_dir_all(dir.join("web")).unwrap();
    std::fs::write(
        dir.join("web/Dockerfile"),
        "FROM busybox:test\nRUN echo built-by-compose > /built\nCMD [\"sleep\", \"3600\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("compose.yaml"),
        r#"services:
  db:
    image: busybox:test
    command: ["sh", "-c", "echo db-starting; mkdir -p /data/www; echo db-data > /data/www/index.html; echo db-ready; exec httpd -f -p 8000 -h /data/www"]
    volumes:
      - data:/data
    healthcheck:
      test: ["CMD", "test", "-f", "/data/www/index.html"]
      interval: 1s
      timeout: 5s
      retries: 120
  web:
    build: ./web
    depends_on:
      db:
        condition: service_healthy
    healthcheck:
      test: ["CMD", "test", "-f", "/built"]
      interval: 1s
      timeout: 5s
      retries: 120
  tool:
    image: busybox:test
    profiles: ["tools"]
    command: ["echo", "the tool ran"]
volumes:
  data:
"#,
    )
    .unwrap();
}

fn compose_scenarios(jw: &JobWork) {
    let work = &jw.work;
    let project = work.join("proj");
    write_compose_project(&project);
    let c = || {
        let mut c = jw.cli();
        c.current_dir(&project).args(["compose", "-p", "berthproj"]);
        c
    };
    run("compose build", c().arg("build"));
    run("compose up -d --wait", c().args(["up", "-d", "--wait"]));
    let ps = text(&run("compose ps", c().args(["ps", "--format", "json"])).stdout);
    // compose 2.26 prints one JSON object per line.
    let services: Vec<serde_json::Value> = ps
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("compose ps: {e}: {l}")))
        .collect();
    let mut names: Vec<&str> = services
        .iter()
        .map(|s| s["Service"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["db", "web"],
        "the profile's service stays down: {ps}"
    );
    for s in &services {
        assert_eq!(s["Health"], "healthy", "{s}");
    }
    // Service DNS on the project's network.
    let o = run(
        "compose exec",
        c().args(["exec", "-T", "web", "sh", "-c"])
            .arg("nslookup db >/dev/null && printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc db 8000"),
    );
    assert!(text(&o.stdout).contains("db-data"), "{}", text(&o.stdout));
    assert_eq!(
        text(&run("exec", c().args(["exec", "-T", "web", "cat", "/built"])).stdout).trim(),
        "built-by-compose"
    );
    // logs, and logs -f streaming until the line it waits for.
    let logs = text(&run("compose logs", c().args(["logs", "db"])).stdout);
    assert!(logs.contains("db-ready"), "{logs}");
    let mut follow = c()
        .args(["logs", "-f", "db"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let saw = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("db-ready"));
    let still_following = follow.try_wait().unwrap().is_none();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(saw, "logs -f never showed the line");
    assert!(still_following, "logs -f returned instead of following");
    // run --rm of a profile's service, cp out of a service.
    let o = run(
        "compose run --rm",
        c().args(["--profile", "tools", "run", "--rm", "-T", "tool"]),
    );
    assert!(
        text(&o.stdout).contains("the tool ran"),
        "{}",
        text(&o.stdout)
    );
    let copied = work.join("index.html");
    run(
        "compose cp",
        c().args(["cp", "db:/data/www/index.html"]).arg(&copied),
    );
    assert_eq!(std::fs::read_to_string(&copied).unwrap().trim(), "db-data");
    // down -v leaves nothing of the project.
    run(
        "compose down -v",
        c().args(["down", "-v", "--remove-orphans"]),
    );
    let left = |args: &[&str]| {
        text(&run("list", jw.cli().args(args)).stdout)
            .lines()
            .filter(|l| l.contains("berthproj"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert!(left(&["ps", "-a", "--format", "{{.Names}}"]).is_empty());
    assert!(left(&["volume", "ls", "--format", "{{.Name}}"]).is_empty());
    assert!(left(&["network", "ls", "--format", "{{.Name}}"]).is_empty());
}

fn compose_test(kind: EngineKind, n: u32, name: &str) {
    if !prerequisites() {
        return;
    }
    plugins();
    let engine = Arc::new(berth::sandbox::Engine::new(config(kind, n, name)).expect("engine"));
    let jw = JobWork::open(FrontDoor::start_engine(engine, name, |_| {}), name);
    compose_scenarios(&jw);
    jw.remove(name);
}

#[test]
fn compose_v2_builds_and_runs_a_project_on_the_system_engine() {
    compose_test(EngineKind::System, 50, "compose-sys");
}

#[test]
fn compose_v2_builds_and_runs_a_project_on_the_debian13_engine() {
    compose_test(EngineKind::Debian13, 51, "compose-d13");
}

/// compose v1 (Debian 12's docker-compose 1.29, docker-py underneath)
/// builds with the legacy builder through the `/build` API itself.
#[test]
fn compose_v1_still_builds_and_runs_a_project() {
    if !prerequisites() {
        return;
    }
    assert!(
        Path::new("/usr/bin/docker-compose").exists(),
        "compose v1 is missing: apt-get install docker-compose"
    );
    let name = "compose-v1";
    let jw = JobWork::open(FrontDoor::start(52, name), name);
    let job = &jw.job;
    let project = jw.work.join("proj");
    std::fs::create_dir_all(project.join("web")).unwrap();
    std::fs::write(
        project.join("web/Dockerfile"),
        "FROM busybox:test\nRUN echo v1-built > /built\nCMD [\"sleep\", \"3600\"]\n",
    )
    .unwrap();
    std::fs::write(
        project.join("docker-compose.yml"),
        "version: \"3\"\nservices:\n  web:\n    build: ./web\n",
    )
    .unwrap();
    let v1 = || {
        let mut c = Command::new("docker-compose");
        c.current_dir(&project)
            .args(["-p", "berthv1"])
            .env("DOCKER_HOST", &job.endpoint)
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", &job.dir)
            // requests would trust this bundle instead of the job's CA.
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .stdin(Stdio::null());
        c
    };
    run(
        "docker-compose up -d --build",
        v1().args(["up", "-d", "--build"]),
    );
    let o = run(
        "docker-compose exec",
        v1().args(["exec", "-T", "web", "cat", "/built"]),
    );
    assert_eq!(text(&o.stdout).trim(), "v1-built");
    run("docker-compose down -v", v1().args(["down", "-v"]));
    let ps = text(&run("ps", jw.cli().args(["ps", "-aq"])).stdout);
    assert!(ps.trim().is_empty(), "{ps}");
}

/// Processes on the host whose command line is exactly `cmdline` (NUL
/// separated, as /proc shows it).
fn processes_running(cmdline: &[u8]) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.as_slice() == cmdline))
        .count()
}

/// A build whose client is killed (SIGKILL of the CLI) during a `RUN`: the
/// step stops, the job keeps serving, and `job rm` takes it all.
fn killed_client_test(kind: EngineKind, n: u32, name: &str, secs: &str) {
    if !prerequisites() {
        return;
    }
    plugins();
    let engine = Arc::new(berth::sandbox::Engine::new(config(kind, n, name)).expect("engine"));
    let jw = JobWork::open(FrontDoor::start_engine(engine, name, |_| {}), name);
    let ctx = jw.work.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    // A step that would run for an hour, recognisable on the host by
    // its command line.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox:test\nRUN [\"sleep\", \"{secs}\"]\n"),
    )
    .unwrap();
    let marker = format!("sleep\0{secs}\0");
    let mut build = jw
        .cli()
        .args(["build", "-t", "slow:1"])
        .arg(&ctx)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while processes_running(marker.as_bytes()) == 0 {
        assert!(
            Instant::now() < deadline && build.try_wait().unwrap().is_none(),
            "{kind:?}: the RUN step never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL: the client vanishes without a word.
    build.kill().unwrap();
    build.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while processes_running(marker.as_bytes()) != 0 {
        assert!(
            Instant::now() < deadline,
            "{kind:?}: the build's step kept running after its client was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The job keeps serving, builds included.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test\nRUN echo after > /after\n",
    )
    .unwrap();
    run(
        "a build after the killed one",
        jw.cli().args(["build", "-t", "after:1"]).arg(&ctx),
    );
    assert_eq!(jw.cat("after:1", "/after"), "after");
    let t = Instant::now();
    jw.remove(name);
    eprintln!(
        "{kind:?}: job rm after a killed build took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_client_killed_mid_build_leaves_no_build_behind_on_the_system_engine() {
    killed_client_test(EngineKind::System, 53, "bk-kill-sys", "3597");
}

#[test]
fn a_client_killed_mid_build_leaves_no_build_behind_on_the_debian13_engine() {
    killed_client_test(EngineKind::Debian13, 54, "bk-kill-d13", "3598");
}

/// The in-process agent's own log, every level, to a file: what an
/// operator's journal would hold.
fn agent_log() -> &'static Path {
    static LOG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let path = PathBuf::from(format!(
            "/var/lib/bt/buildkit-agent-{}.log",
            std::process::id()
        ));
        std::fs::create_dir_all("/var/lib/bt").unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        path
    })
}

#[test]
fn a_build_secret_reaches_neither_the_audit_nor_the_agents_log() {
    if !prerequisites() {
        return;
    }
    plugins();
    let log = agent_log();
    let name = "bk-secret";
    let jw = JobWork::open(FrontDoor::start(55, name), name);
    let (work, job) = (&jw.work, &jw.job);
    let ctx = work.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test\nRUN --mount=type=secret,id=token,required=true --mount=type=secret,id=envtok,required=true cat /run/secrets/token /run/secrets/envtok | wc -c > /len\n",
    )
    .unwrap();
    let secret = "berth-audit-secret-5b21e";
    let env_secret = "berth-audit-secret-env-c44d";
    std::fs::write(work.join("token"), secret).unwrap();
    run(
        "build with secrets",
        jw.cli()
            .args(["build", "--progress=plain", "-t", "secret:1"])
            .arg("--secret")
            .arg(format!("id=token,src={}", work.join("token").display()))
            .args(["--secret", "id=envtok,env=BERTH_TEST_ENV_SECRET"])
            .env("BERTH_TEST_ENV_SECRET", env_secret)
            .arg(&ctx),
    );
    assert_eq!(
        jw.cat("secret:1", "/len"),
        (secret.len() + env_secret.len()).to_string()
    );
    assert_no_secret_in_image(&jw, "secret:1", &[secret, env_secret]);
    let audit = jw.fd.job_cli(&["audit", &job.id, "--json"]);
    assert!(audit.status.success());
    let audit = text(&audit.stdout);
    assert!(
        audit.contains("/session") && audit.contains("/grpc"),
        "the audit lacks the build's requests:\n{audit}"
    );
    jw.remove(name);
    let job_id = job.id.clone();
    drop(jw);
    let agent = std::fs::read_to_string(log).unwrap();
    assert!(
        agent.contains(&job_id),
        "the agent's log has nothing of the job: is it the right log?"
    );
    for s in [secret, env_secret] {
        assert!(!audit.contains(s), "the secret is in the audit");
        assert!(!agent.contains(s), "the secret is in the agent's log");
    }
}

/// The status line and body of the first answer on a fresh TLS connection
/// that sent `raw`.
fn answer(port: u16, bundle: &Path, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = std::fs::read(bundle.join("ca.pem")).unwrap();
    let cert = std::fs::read(bundle.join("cert.pem")).unwrap();
    let key = std::fs::read(bundle.join("key.pem")).unwrap();
    rt().block_on(async {
        let mut s = tls_connect(port, &ca, Some((&cert, &key))).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the head and Content-Length bytes of body are in.
        let complete = |out: &[u8]| {
            let text = String::from_utf8_lossy(out);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            len.is_none_or(|n| body.len() >= n)
        };
        while !complete(&out) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn a_malformed_session_upgrade_gets_a_clear_400_and_the_job_keeps_serving() {
    if !prerequisites() {
        return;
    }
    plugins();
    let name = "bk-session";
    let jw = JobWork::open(FrontDoor::start(56, name), name);
    let (fd, job) = (&jw.fd, &jw.job);
    let head = |path: &str, extra: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\n{extra}\r\n")
    };
    for (what, raw, says) in [
        (
            "no Upgrade header",
            head("/session", "X-Docker-Expose-Session-Uuid: a1\r\n"),
            "Upgrade: h2c",
        ),
        (
            "another protocol",
            head("/v1.41/grpc", "Upgrade: websocket\r\n"),
            "Upgrade: h2c",
        ),
        (
            "a body with the upgrade",
            head(
                "/session",
                "Upgrade: h2c\r\nX-Docker-Expose-Session-Uuid: a2\r\nContent-Length: 5\r\n",
            ) + "hello",
            "no body",
        ),
        (
            "a chunked body with the upgrade",
            head("/grpc", "Upgrade: h2c\r\nTransfer-Encoding: chunked\r\n")
                + "5\r\nhello\r\n0\r\n\r\n",
            "no body",
        ),
        (
            "a nameless session",
            head("/session", "Upgrade: h2c\r\n"),
            "X-Docker-Expose-Session-Uuid",
        ),
    ] {
        let a = answer(fd.port, &job.dir, &raw);
        assert!(a.starts_with("HTTP/1.1 400"), "{what}: {a}");
        assert!(a.contains(says) && a.contains("BuildKit"), "{what}: {a}");
    }
    // The audit tells each one apart, and the job builds as before.
    let audit = text(&fd.job_cli(&["audit", &job.id, "--json"]).stdout);
    assert_eq!(audit.matches("malformed-upgrade").count(), 5, "{audit}");
    let work = &jw.work;
    std::fs::write(
        work.join("Dockerfile"),
        "FROM busybox:test\nRUN echo still > /still\n",
    )
    .unwrap();
    run(
        "a build after the malformed upgrades",
        jw.cli().args(["build", "-t", "still:1"]).arg(work),
    );
    assert_eq!(jw.cat("still:1", "/still"), "still");
}

/// An image for two platforms in one build, as pipelines written for
/// docker:dind push them: `buildx build --platform linux/amd64,linux/arm64
/// --push` on `kind`'s engine with the containerd image store, its arm64
/// `RUN` under the host's emulation. The registry holds an index of both
/// (`buildx imagetools inspect`), and each platform pulled back into the
/// job runs what its own build wrote.
fn multi_platform_push(kind: EngineKind, n: u32, name: &str) {
    plugins();
    require_host_arm64();
    let (fd, _host, registry, addr, ca_file) =
        door_with_registry_store(kind, n, name, Policy::default(), ImageStore::Containerd);
    let jw = JobWork::open(fd, name);
    let info = run(
        "docker info",
        jw.cli()
            .args(["info", "--format", "{{json .DriverStatus}}"]),
    );
    assert!(
        text(&info.stdout).contains("io.containerd.snapshotter"),
        "the job's dockerd is not on the containerd image store: {}",
        text(&info.stdout)
    );
    // No base image: each platform's static busybox copied in, so the
    // build needs no registry but the one it pushes to.
    let ctx = jw.work.join("multi");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox-amd64")).unwrap();
    std::fs::copy(arm64_busybox(), ctx.join("busybox-arm64")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY busybox-$TARGETARCH /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         RUN uname -m > /built-on\nCMD [\"cat\", \"/built-on\"]\n",
    )
    .unwrap();
    let image = format!("{addr}/berth/multi:1");
    run(
        "buildx build --platform linux/amd64,linux/arm64 --push",
        jw.cli().current_dir(&ctx).args([
            "buildx",
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--push",
            "-t",
            &image,
            ".",
        ]),
    );
    // The CLI reads the registry itself: Go takes the private CA from
    // SSL_CERT_FILE.
    let inspect = run(
        "buildx imagetools inspect",
        jw.cli()
            .env("SSL_CERT_FILE", &ca_file)
            .args(["buildx", "imagetools", "inspect", &image]),
    );
    let listed = text(&inspect.stdout);
    // BuildKit's default provenance attestations ride along, one
    // `unknown/unknown` manifest per platform.
    let platforms: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Platform:"))
        .map(str::trim)
        .filter(|p| *p != "unknown/unknown")
        .collect();
    assert_eq!(
        platforms,
        ["linux/amd64", "linux/arm64"],
        "the pushed index:\n{listed}"
    );
    assert!(
        registry.log_count("\"PUT /v2/berth/multi/manifests/1") >= 1,
        "the registry saw no index pushed"
    );
    for (platform, arch) in [("linux/amd64", "x86_64"), ("linux/arm64", "aarch64")] {
        run("rmi", jw.cli().args(["rmi", "-f", &image]));
        let ran = run(
            &format!("run --platform {platform}"),
            jw.cli().args([
                "run",
                "--rm",
                "--pull",
                "always",
                "--platform",
                platform,
                &image,
            ]),
        );
        assert_eq!(text(&ran.stdout).trim(), arch, "{platform}");
    }
    jw.remove(name);
}

#[test]
fn multi_platform_images_push_to_a_registry_on_the_debian13_engine() {
    if !prerequisites() {
        return;
    }
    multi_platform_push(EngineKind::Debian13, 74, "bk-multi-d13");
}

/// The system engine: the multi-platform push where its dockerd has the
/// containerd image store (24.0 on: the Debian 13 guest's 26.1); where it
/// has not (Debian 12's 20.10, here and in the Debian 12 guest), the agent
/// refuses `image_store = "containerd"` when it starts, naming the key and
/// the fix.
#[test]
fn multi_platform_images_on_the_system_engine_push_or_are_refused_before_24() {
    if !prerequisites() {
        return;
    }
    let o = Command::new("/usr/sbin/dockerd")
        .arg("--version")
        .output()
        .unwrap();
    let version = berth::sandbox::engines::Version::find(&text(&o.stdout))
        .unwrap_or_else(|| panic!("dockerd --version: {}", text(&o.stdout)));
    if version >= ImageStore::CONTAINERD_SINCE {
        multi_platform_push(EngineKind::System, 75, "bk-multi-sys");
        return;
    }
    let cfg = SandboxConfig {
        image_store: ImageStore::Containerd,
        ..config(EngineKind::System, 75, "bk-multi-sys")
    };
    let err = berth::sandbox::Engine::new(cfg)
        .err()
        .unwrap_or_else(|| panic!("an engine on the containerd store with dockerd {version}"))
        .to_string();
    assert!(
        err.contains("image_store = \"containerd\" needs dockerd 24.0.0 or later"),
        "{err}"
    );
}

/// Which process starts the job's containerd, and what its end does to the
/// job. The job's init starts containerd with berth's configuration and
/// hands it to dockerd (dockerd 26.1 would wait a second for one it starts
/// itself); a containerd that ends then ends the job, reported as failed.
fn containerd_test(kind: EngineKind, n: u32, name: &str) {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = berth::sandbox::Engine::new(config(kind, n, name)).unwrap();
    let sb = rt.block_on(e.start(None)).unwrap();
    let comm = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default()
    };
    let parent = |p: u32| -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        // After the command's closing parenthesis: state, then the ppid.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(1).unwrap().parse().unwrap()
    };
    let one = |name: &str| -> u32 {
        let found: Vec<u32> = sb.pids().into_iter().filter(|p| comm(p) == name).collect();
        assert_eq!(found.len(), 1, "one {name} in the job: {found:?}");
        found[0]
    };
    let (dockerd, containerd) = (one("dockerd"), one("containerd"));
    let version = docker_ok(
        &sb.socket(),
        &["version", "--format", "{{.Server.Version}}"],
    );
    assert_eq!(
        parent(containerd),
        parent(dockerd),
        "dockerd {version}: the job's init starts containerd beside dockerd"
    );
    import_busybox(&sb.socket());
    let out = docker_ok(
        &sb.socket(),
        &["run", "--rm", "busybox:test", "echo", "ran"],
    );
    assert_eq!(out.trim(), "ran");
    let traces = Traces::capture(&e, &sb);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(containerd as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), sb.ended()).await })
        .expect("the end of containerd is noticed");
    match status {
        berth::sandbox::Status::Failed(why) => {
            assert!(why.contains("containerd"), "{why}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let log = std::fs::read_to_string(sb.dockerd_log()).unwrap();
    assert!(
        log.contains("containerd exited") && log.contains("SIGKILL"),
        "the job's log says how: {log}"
    );
    rt.block_on(e.teardown(sb.id())).unwrap();
    traces.assert_gone();
}

#[test]
fn the_jobs_containerd_is_started_first_on_the_system_engine_and_its_end_fails_the_job() {
    containerd_test(EngineKind::System, 109, "bk-ctrd-sys");
}

#[test]
fn the_jobs_containerd_is_started_first_on_the_debian13_engine_and_its_end_fails_the_job() {
    containerd_test(EngineKind::Debian13, 110, "bk-ctrd-d13");
}
