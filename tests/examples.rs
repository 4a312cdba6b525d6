//! The CI examples run as written: examples/jenkins/Jenkinsfile's steps,
//! examples/github/ci.yml's jobs (tests/drivers/github_actions.py runs them
//! as a self-hosted runner would) and examples/github/ephemeral-runner.sh
//! with a stand-in runner, against a real agent with the real `berth` and
//! `docker` CLIs. Commands are taken from the files, so a changed example
//! is the one tested.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use berth::sandbox::{Engine, SandboxConfig};
use common::{FrontDoor, berth_bin, engine_config, prerequisites, require_tools, write_config};

/// The tests share test numbers 66 and 67 (uid, address and port pools):
/// one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Jenkins' user on its agent, the owner of its workspaces.
const JENKINS: (u32, u32) = (4521, 4522);
/// The runner's user of the step-by-step workflow.
const RUNNER: (u32, u32) = (4531, 4532);

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example(path: &str) -> String {
    std::fs::read_to_string(manifest().join("examples").join(path)).unwrap()
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Panics, naming the fix, when a tool the examples or the driver need is
/// missing.
fn example_prerequisites() -> bool {
    if !prerequisites() {
        return false;
    }
    require_tools(&[
        (&["jq", "--version"][..], "apt-get install jq"),
        (&["setpriv", "--version"][..], "apt-get install util-linux"),
        (&["useradd", "--help"][..], "apt-get install passwd"),
        (
            &["python3", "-c", "import yaml"][..],
            "python3 with PyYAML: python3 -m pip install pyyaml",
        ),
    ]);
    true
}

/// A fresh directory for one test's host side (workspaces, homes, certs).
fn base_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/var/lib/bt-ws/{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn chown_r(path: &Path, owner: (u32, u32)) {
    let out = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", owner.0, owner.1))
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "chown {}", path.display());
}

fn owned_dir(path: &Path, owner: (u32, u32)) {
    std::fs::create_dir_all(path).unwrap();
    chown_r(path, owner);
}

/// A checkout of this repository's pipelines (the scripts and the hello
/// app the examples build) in `dir`, the CI user's.
fn checkout(dir: &Path, owner: (u32, u32)) {
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    for from in [
        "pipelines/scripts",
        "pipelines/apps",
        "pipelines/hello.toml",
    ] {
        let out = Command::new("cp")
            .arg("-a")
            .arg(manifest().join(from))
            .arg(dir.join("pipelines"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cp {from}");
    }
    chown_r(dir, owner);
}

/// An agent on `addr`:2376 (its server certificate names it) that allows
/// workspaces below `allowed`.
fn agent(n: u32, name: &str, addr: &str, allowed: &[&Path]) -> FrontDoor {
    let cfg = SandboxConfig {
        workspaces: berth::sandbox::fs::workspaces::WorkspacesConfig {
            allowed_roots: allowed.iter().map(|p| p.to_path_buf()).collect(),
        },
        ..engine_config(n, name)
    };
    let engine = Arc::new(Engine::new(cfg).expect("engine"));
    FrontDoor::start_engine(engine, name, |c| {
        c.listen = format!("{addr}:2376").parse().unwrap();
        c.san = vec![addr.to_string()];
    })
}

/// The agent's admin bundle as an operator gives it to a CI user: a copy
/// in `dir`/admin, readable by `owner` only. Returns `dir`.
fn admin_bundle_for(fd: &FrontDoor, dir: &Path, owner: (u32, u32)) -> PathBuf {
    let admin = dir.join("admin");
    std::fs::create_dir_all(&admin).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(fd.certs.join("admin").join(f), admin.join(f)).unwrap();
    }
    chown_r(dir, owner);
    std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir.to_path_buf()
}

/// PATH with the berth binary under test first, as if installed.
fn path_env() -> String {
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        berth_bin().parent().unwrap().display()
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The berth jobs the agent has.
fn berth_jobs(fd: &FrontDoor) -> Vec<serde_json::Value> {
    let out = fd.job_cli(&["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What a job's certificate asked its daemon, as `berth job audit` keeps
/// it: one "METHOD target" line per request.
fn audited(fd: &FrontDoor, id: &str) -> String {
    let out = fd.job_cli(&["audit", id, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "request" && r["identity"] == "job")
        .map(|r| {
            format!(
                "{} {}\n",
                r["method"].as_str().unwrap(),
                r["target"].as_str().unwrap()
            )
        })
        .collect()
}

// ---------------------------------------------------------------- Jenkins

/// One thing the Jenkinsfile does, in its order.
#[derive(Debug)]
enum Jenkins {
    /// `environment { KEY = 'value' }`.
    Environment(String),
    /// `readJSON(text: sh(returnStdout: true, script: "…"))`: the Groovy
    /// string, not yet interpolated.
    ReadJson(String),
    /// `env.NAME = job.FIELD` (Some(FIELD)) or `env.NAME = 'literal'`.
    SetEnv(String, Result<String, String>),
    Sh(String),
    /// `docker.build("image", "dir")`.
    Build(String, String),
    /// `app.inside { sh '…' … }`.
    Inside(Vec<String>),
    Archive(String),
    /// `sh '…'` in `post { always { } }`.
    PostSh(String),
}

/// Between the first and the last `q` of `s`.
fn quoted(s: &str, q: char) -> &str {
    let a = s.find(q).expect("an opening quote") + 1;
    let b = s.rfind(q).expect("a closing quote");
    &s[a..b]
}

fn parse_jenkinsfile(src: &str) -> Vec<Jenkins> {
    let mut out = Vec::new();
    let (mut in_env, mut in_post, mut read_json) = (false, false, false);
    let mut inside: Option<Vec<String>> = None;
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with("//") || t.is_empty() {
            continue;
        }
        if t == "environment {" {
            in_env = true;
        } else if in_env && t == "}" {
            in_env = false;
        } else if in_env {
            let (k, _) = t.split_once('=').expect("KEY = 'value'");
            out.push(Jenkins::Environment(k.trim().to_string()));
        } else if t.starts_with("post {") {
            in_post = true;
        } else if t.ends_with(".inside {") {
            inside = Some(Vec::new());
        } else if inside.is_some() && t == "}" {
            out.push(Jenkins::Inside(inside.take().unwrap()));
        } else if t.contains("readJSON(text: sh(returnStdout: true,") {
            read_json = true;
        } else if let Some(rest) = t.strip_prefix("script: ").filter(|_| read_json) {
            read_json = false;
            out.push(Jenkins::ReadJson(quoted(rest, '"').to_string()));
        } else if let Some(rest) = t.strip_prefix("env.") {
            let (k, v) = rest.split_once('=').expect("env.NAME = …");
            let v = v.trim();
            let source = match v.strip_prefix("job.") {
                Some(field) => Ok(field.to_string()),
                None => Err(quoted(v, '\'').to_string()),
            };
            out.push(Jenkins::SetEnv(k.trim().to_string(), source));
        } else if t.contains("docker.build(") {
            let args = &t[t.find("docker.build(").unwrap() + 13..t.rfind(')').unwrap()];
            let (image, dir) = args.split_once(',').expect("docker.build(image, dir)");
            out.push(Jenkins::Build(
                quoted(image, '"').to_string(),
                quoted(dir, '"').to_string(),
            ));
        } else if let Some(rest) = t.strip_prefix("archiveArtifacts artifacts: ") {
            out.push(Jenkins::Archive(
                quoted(rest.split(',').next().unwrap(), '\'').to_string(),
            ));
        } else if t.starts_with("sh '") || t.starts_with("steps { sh '") {
            let script = quoted(t.trim_end_matches('}').trim(), '\'').to_string();
            match (&mut inside, in_post) {
                (Some(steps), _) => steps.push(script),
                (None, true) => out.push(Jenkins::PostSh(script)),
                (None, false) => out.push(Jenkins::Sh(script)),
            }
        } else if ["sh ", "sh(", "bat ", "powershell "]
            .iter()
            .any(|s| t.contains(s))
        {
            panic!("a step this test cannot run as written: {t}");
        }
    }
    out
}

/// Groovy's `${env.NAME}` in a double-quoted string.
fn groovy(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("${{env.{k}}}"), v);
    }
    assert!(!out.contains("${"), "uninterpolated: {out}");
    out
}

/// Jenkins' agent for one build: its user, workspace and environment.
struct JenkinsAgent {
    ws: PathBuf,
    env: BTreeMap<String, String>,
    steps: u32,
}

impl JenkinsAgent {
    fn tmp(&self) -> PathBuf {
        PathBuf::from(format!("{}@tmp", self.ws.display()))
    }

    /// A durable-task script dir in WORKSPACE@tmp with `script`, as Jenkins
    /// writes it for each `sh` step.
    fn durable(&mut self, script: &str) -> PathBuf {
        self.steps += 1;
        let d = self.tmp().join(format!("durable-{:08x}", self.steps));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("script.sh"), script).unwrap();
        chown_r(&d, JENKINS);
        d
    }

    /// A command as Jenkins' user, with the build's environment only.
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", JENKINS.0))
            .arg(format!("--regid={}", JENKINS.1))
            .args(["--clear-groups", "--"])
            .args(argv)
            .current_dir(&self.ws)
            .env_clear()
            .envs(&self.env);
        c
    }

    /// `sh 'script'` on the agent: `sh -xe script.sh` in the workspace.
    fn sh(&mut self, script: &str) -> String {
        let d = self.durable(script);
        let out = self
            .command(&["sh", "-xe", d.join("script.sh").to_str().unwrap()])
            .output()
            .unwrap();
        eprintln!("[jenkins sh] {script}\n{}", text(&out));
        assert!(out.status.success(), "sh '{script}' failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn docker(&self, args: &[&str]) -> String {
        let mut argv = vec!["docker"];
        argv.extend(args);
        let out = self.command(&argv).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// docker-workflow's `image.inside { sh … }`: inspect, `run -t -d -u
    /// UID:GID -w WS -v WS:WS -v WS@tmp:WS@tmp … cat`, top, one `exec` of
    /// the durable script per step (Jenkins reads its log and result on its
    /// own filesystem), stop, rm.
    fn inside(&mut self, image: &str, steps: &[String]) {
        let ws = self.ws.display().to_string();
        let tmp = self.tmp().display().to_string();
        let user = format!("{}:{}", JENKINS.0, JENKINS.1);
        self.docker(&["inspect", "-f", ".", image]);
        let vol = format!("{ws}:{ws}:rw,z");
        let tmp_vol = format!("{tmp}:{tmp}:rw,z");
        let cid = self.docker(&[
            "run", "-t", "-d", "-u", &user, "-w", &ws, "-v", &vol, "-v", &tmp_vol, "-e",
            "********", image, "cat",
        ]);
        let cid = cid.trim().to_string();
        let top = self.docker(&["top", &cid, "-eo", "pid,comm"]);
        assert!(top.contains("cat"), "{top}");
        for script in steps {
            let d = self.durable(script);
            let dd = d.display();
            let launcher = format!(
                "cd \"{ws}\" && sh -xe '{dd}/script.sh' > '{dd}/jenkins-log.txt' 2>&1; \
                 echo $? > '{dd}/jenkins-result.txt'"
            );
            self.docker(&["exec", &cid, "sh", "-c", &launcher]);
            let log = std::fs::read_to_string(d.join("jenkins-log.txt")).unwrap();
            eprintln!("[jenkins inside] {script}\n{log}");
            let result = std::fs::read_to_string(d.join("jenkins-result.txt")).unwrap();
            assert_eq!(result.trim(), "0", "sh '{script}' in the container: {log}");
        }
        self.docker(&["stop", "--time=1", &cid]);
        self.docker(&["rm", "-f", &cid]);
    }
}

#[test]
fn the_jenkinsfile_runs_as_written() {
    if !example_prerequisites() {
        return;
    }
    let _one = serial();
    let base = base_dir("ex-jenkins");
    let jobs = base.join("workspace");
    owned_dir(&jobs, JENKINS);
    let ws = jobs.join("app_main");
    checkout(&ws, JENKINS);
    // Jenkins keeps its step scripts there from the first step on.
    owned_dir(&PathBuf::from(format!("{}@tmp", ws.display())), JENKINS);
    let home = base.join("home");
    owned_dir(&home, JENKINS);
    let fd = agent(66, "ex-jenkins", "127.0.66.1", &[&jobs]);
    let certs = admin_bundle_for(&fd, &base.join("berth-certs"), JENKINS);

    let steps = parse_jenkinsfile(&example("jenkins/Jenkinsfile"));
    eprintln!("{steps:#?}");
    let kinds: Vec<&str> = steps
        .iter()
        .map(|s| match s {
            Jenkins::Environment(_) => "environment",
            Jenkins::ReadJson(_) => "readJSON",
            Jenkins::SetEnv(..) => "env",
            Jenkins::Sh(_) => "sh",
            Jenkins::Build(..) => "docker.build",
            Jenkins::Inside(_) => "inside",
            Jenkins::Archive(_) => "archiveArtifacts",
            Jenkins::PostSh(_) => "post sh",
        })
        .collect();
    for want in [
        "environment",
        "readJSON",
        "env",
        "sh",
        "docker.build",
        "inside",
        "archiveArtifacts",
        "post sh",
    ] {
        assert!(
            kinds.contains(&want),
            "no {want} in the Jenkinsfile: {kinds:?}"
        );
    }

    // The Jenkins agent's environment for a multibranch build; the
    // pipeline's `environment` names this host's agent and admin bundle.
    let mut env = BTreeMap::from([
        ("PATH".to_string(), path_env()),
        ("HOME".into(), home.display().to_string()),
        ("WORKSPACE".into(), ws.display().to_string()),
        ("JOB_NAME".into(), "app/main".into()),
        ("BUILD_NUMBER".into(), "7".into()),
    ]);
    let host_setting = BTreeMap::from([
        ("BERTH_ENDPOINT", "127.0.66.1:2376".to_string()),
        ("BERTH_CERTS_DIR", certs.display().to_string()),
    ]);
    let mut jenkins = JenkinsAgent {
        ws: ws.clone(),
        env: BTreeMap::new(),
        steps: 0,
    };
    let mut job = serde_json::Value::Null;
    let mut image = None;
    let mut post = Vec::new();
    let mut archived = Vec::new();
    for step in &steps {
        jenkins.env = env.clone();
        match step {
            Jenkins::Environment(k) => {
                let v = host_setting
                    .get(k.as_str())
                    .unwrap_or_else(|| panic!("a setting the test does not know: {k}"));
                env.insert(k.clone(), v.clone());
            }
            Jenkins::ReadJson(script) => {
                let stdout = jenkins.sh(&groovy(script, &env));
                job = serde_json::from_str(&stdout).expect("berth job create --json");
            }
            Jenkins::SetEnv(k, Ok(field)) => {
                let v = job[field.as_str()]
                    .as_str()
                    .unwrap_or_else(|| panic!("no {field} in {job}"));
                env.insert(k.clone(), v.to_string());
            }
            Jenkins::SetEnv(k, Err(lit)) => {
                env.insert(k.clone(), lit.clone());
            }
            Jenkins::Sh(script) => {
                jenkins.sh(script);
            }
            Jenkins::Build(name, dir) => {
                // docker-workflow's docker.build(image, args).
                let name = groovy(name, &env);
                jenkins.docker(&["build", "-t", &name, dir]);
                image = Some(name);
            }
            Jenkins::Inside(scripts) => {
                jenkins.inside(image.as_deref().expect("docker.build first"), scripts);
            }
            Jenkins::Archive(pattern) => archived.push(pattern.clone()),
            Jenkins::PostSh(script) => post.push(script.clone()),
        }
    }

    // The build talked to the agent's job, with the bundle it was given.
    let id = env["BERTH_JOB_ID"].clone();
    assert_eq!(env["DOCKER_HOST"], "tcp://127.0.66.1:2376");
    let bundle = PathBuf::from(&env["DOCKER_CERT_PATH"]);
    assert!(
        bundle.starts_with(jenkins.tmp()),
        "{} is not in WORKSPACE@tmp",
        bundle.display()
    );
    let listed = berth_jobs(&fd);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(
        listed[0]["workspaces"],
        serde_json::json!([ws.display().to_string()])
    );
    let audit = audited(&fd, &id);
    let built = format!("/images/{}/json", image.as_deref().unwrap());
    for want in [
        "/images/create",
        built.as_str(),
        "/containers/create",
        "/exec",
    ] {
        assert!(
            audit.contains(want),
            "the job was not asked {want}: {audit}"
        );
    }
    // archiveArtifacts finds the report, written in the container as
    // Jenkins' user and so its on the host.
    assert_eq!(archived, ["reports/**"]);
    let report = ws.join("reports/test.txt");
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        "PASS: 3 checks\n"
    );
    for f in [ws.join("reports"), report] {
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), JENKINS, "{}", f.display());
    }

    // post { always { … } }
    jenkins.env = env.clone();
    for script in &post {
        jenkins.sh(script);
    }
    assert!(
        berth_jobs(&fd).is_empty(),
        "the berth job outlived the build"
    );
    assert!(!bundle.exists(), "{} is left", bundle.display());
    drop(fd);
    let _ = std::fs::remove_dir_all(&base);
}

// ----------------------------------------------------------------- GitHub

/// Runs `job` of examples/github/ci.yml with the driver, in the checkout
/// `ws`; returns its exit code and output.
fn actions_job(
    job: &str,
    ws: &Path,
    temp: &Path,
    user: Option<(u32, u32)>,
    env: &[(&str, String)],
) -> (i32, String) {
    let mut c = Command::new("python3");
    c.arg(manifest().join("tests/drivers/github_actions.py"))
        .arg("--workflow")
        .arg(manifest().join("examples/github/ci.yml"))
        .args([
            "--job",
            job,
            "--sha",
            "0123456789abcdef0123456789abcdef01234567",
        ])
        .arg("--workspace")
        .arg(ws)
        .arg("--runner-temp")
        .arg(temp);
    if let Some((u, g)) = user {
        c.arg("--user").arg(format!("{u}:{g}"));
    }
    for k in [
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "BERTH_ENDPOINT",
        "BERTH_CERTS_DIR",
        "BERTH_CONFIG",
    ] {
        c.env_remove(k);
    }
    c.env("PATH", path_env());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let t = text(&out);
    eprintln!("[actions {job}]\n{t}");
    (out.status.code().unwrap_or(-1), t)
}

#[test]
fn the_github_workflow_runs_as_written() {
    if !example_prerequisites() {
        return;
    }
    let _one = serial();
    let base = base_dir("ex-github");
    let home = base.join("home");
    let work = home.join("actions-runner/_work");
    let ws = work.join("app/app");
    let temp = work.join("_temp");
    checkout(&ws, RUNNER);
    owned_dir(&home, RUNNER);
    let fd = agent(67, "ex-github", "127.0.67.1", &[]);
    let certs = admin_bundle_for(&fd, &base.join("berth-certs"), RUNNER);
    // The runner's environment (its .env file) names the agent.
    let runner_env = [
        ("HOME", home.display().to_string()),
        ("BERTH_ENDPOINT", "127.0.67.1:2376".to_string()),
        ("BERTH_CERTS_DIR", certs.display().to_string()),
    ];

    // build-step-by-step: every step, the daemon torn down at the end.
    owned_dir(&temp, RUNNER);
    let (code, out) = actions_job("build-step-by-step", &ws, &temp, Some(RUNNER), &runner_env);
    assert_eq!(code, 0, "{out}");
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("STEP ")).collect();
    assert_eq!(steps.len(), 6, "{steps:?}");
    for s in &steps {
        assert!(s.contains(": 0"), "{s}");
    }
    for want in ["PASS: 3 checks", "removed ", "RESULT success"] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("removed "))
        .unwrap()
        .trim()
        .to_string();
    let audit = audited(&fd, &id);
    for want in ["/images/create", "/containers/create", "/wait"] {
        assert!(
            audit.contains(want),
            "the job was not asked {want}: {audit}"
        );
    }
    assert!(berth_jobs(&fd).is_empty());

    // A failing build: the steps after it are skipped, `if: always()`
    // tears the daemon down all the same.
    let _ = std::fs::remove_dir_all(&temp);
    owned_dir(&temp, RUNNER);
    std::fs::write(
        ws.join("pipelines/apps/hello/Dockerfile"),
        "FROM hello-base:1\nRUN exit 7\n",
    )
    .unwrap();
    let (code, out) = actions_job("build-step-by-step", &ws, &temp, Some(RUNNER), &runner_env);
    assert_eq!(code, 1, "{out}");
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("STEP ")).collect();
    assert!(steps[4].ends_with(": skipped"), "{steps:?}");
    assert!(steps[5].ends_with(": 0"), "{steps:?}");
    assert!(out.contains("removed "), "{out}");
    assert!(
        berth_jobs(&fd).is_empty(),
        "the failed job's daemon is left"
    );
    drop(fd);

    // build: `sudo berth run pipelines/hello.toml` with the embedded
    // agent (sudo stands for itself: the test is root already).
    let bin = base.join("sudo-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("sudo"), "#!/bin/sh\nexec \"$@\"\n").unwrap();
    std::fs::set_permissions(bin.join("sudo"), std::fs::Permissions::from_mode(0o755)).unwrap();
    checkout(&ws, RUNNER);
    let cfg = write_config(67, "ex-github-run", "");
    let path = format!("{}:{}", bin.display(), path_env());
    let (code, out) = actions_job(
        "build",
        &ws,
        &temp,
        None,
        &[("PATH", path), ("BERTH_CONFIG", cfg.display().to_string())],
    );
    assert_eq!(code, 0, "{out}");
    for want in [
        "PASS: 3 checks",
        "hello from berth",
        "pipeline hello: passed",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    assert!(common::jobs_left("ex-github-run").is_empty());
    let _ = std::fs::remove_dir_all(&base);
}

/// A throwaway login user, removed on drop (what an interrupted earlier
/// run left is removed first).
struct User {
    name: String,
    ids: (u32, u32),
}

impl User {
    fn create(name: &str, home: &Path) -> User {
        let _ = Command::new("userdel").arg(name).output();
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/bin/bash",
            ])
            .arg("--home-dir")
            .arg(home)
            .arg(name)
            .output()
            .unwrap();
        assert!(out.status.success(), "useradd {name}: {}", text(&out));
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        User {
            name: name.to_string(),
            ids: (id("-u"), id("-g")),
        }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// A stand-in for actions/runner's `run.sh`: it records who runs it and
/// with which daemon, then makes a `container:` job's docker calls (network,
/// create with the work directory at /__w and externals at /__e, start,
/// exec of a step as root, rm) against DOCKER_HOST, as the runner does.
const RUN_SH: &str = r#"#!/bin/bash
set -eu
{
  echo "uid=$(id -u)"
  echo "args=$*"
  echo "DOCKER_HOST=$DOCKER_HOST"
  echo "DOCKER_TLS_VERIFY=$DOCKER_TLS_VERIFY"
  echo "DOCKER_CERT_PATH=$DOCKER_CERT_PATH"
} > "$PWD/run.log"
docker version --format '{{.Server.Version}}' > /dev/null
docker info --format 'daemon={{.Name}}' >> "$PWD/run.log"
BASE_SH base:1
work=$PWD/_work ext=$PWD/externals
mkdir -p "$work/app/app" "$work/_temp"
printf 'id -u\nls /__e/node20/bin\necho built > build.log\n' > "$work/_temp/step.sh"
docker network create github_network_1 > /dev/null
cid=$(docker create --name job1 --workdir /__w/app/app --network github_network_1 \
  -v "$work:/__w" -v "$ext:/__e:ro" -e GITHUB_ACTIONS=true \
  --entrypoint tail base:1 -f /dev/null)
docker start "$cid" > /dev/null
docker exec -i --workdir /__w/app/app -e GITHUB_ACTIONS=true "$cid" \
  sh -e /__w/_temp/step.sh > "$PWD/step.out"
docker rm --force "$cid" > /dev/null
docker network rm github_network_1 > /dev/null
"#;

#[test]
fn the_ephemeral_runner_gives_each_round_a_job_of_its_own() {
    if !example_prerequisites() {
        return;
    }
    let _one = serial();
    let base = base_dir("ex-runner");
    let home = base.join("home/runner");
    let user = User::create("bt-ex-runner", &home);
    let runner = home.join("actions-runner");
    // The runner as unpacked: its scripts and externals, no _work yet.
    std::fs::create_dir_all(runner.join("externals/node20/bin")).unwrap();
    std::fs::write(runner.join("externals/node20/bin/node"), "#!/bin/sh\n").unwrap();
    std::fs::write(
        runner.join("config.sh"),
        "#!/bin/bash\necho \"uid=$(id -u) args=$*\" > \"$PWD/config.log\"\n",
    )
    .unwrap();
    let base_sh = manifest().join("pipelines/scripts/busybox-base.sh");
    std::fs::write(
        runner.join("run.sh"),
        RUN_SH.replace("BASE_SH", base_sh.to_str().unwrap()),
    )
    .unwrap();
    for f in ["config.sh", "run.sh", "externals/node20/bin/node"] {
        std::fs::set_permissions(runner.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    owned_dir(&home, user.ids);
    let fd = agent(66, "ex-runner", "127.0.66.2", &[&runner]);

    let out = Command::new("bash")
        .arg(manifest().join("examples/github/ephemeral-runner.sh"))
        .env_clear()
        .env("PATH", path_env())
        .env("HOME", "/root")
        .env("RUNNER", &runner)
        .env("RUNNER_USER", &user.name)
        .env("BERTH_ENDPOINT", "127.0.66.2:2376")
        .env("BERTH_CERTS_DIR", &fd.certs)
        .env("GITHUB_URL", "https://github.example/org/app")
        .env("REG_TOKEN", "REGTOKEN")
        .env("BERTH_RUNNER_ROUNDS", "1")
        .output()
        .unwrap();
    eprintln!("[ephemeral-runner.sh]\n{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));

    // Registered once for the round, as the runner's user.
    let config = std::fs::read_to_string(runner.join("config.log")).unwrap();
    assert_eq!(
        config.trim(),
        format!(
            "uid={} args=--unattended --ephemeral --url https://github.example/org/app --token REGTOKEN --labels berth --replace",
            user.ids.0
        )
    );
    // The runner ran as its user, with the job's daemon and bundle.
    let log = std::fs::read_to_string(runner.join("run.log")).unwrap();
    let field = |k: &str| -> String {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {log}"))
            .to_string()
    };
    assert_eq!(field("uid"), user.ids.0.to_string());
    assert_eq!(field("DOCKER_HOST"), "tcp://127.0.66.2:2376");
    assert_eq!(field("DOCKER_TLS_VERIFY"), "1");
    let id = field("daemon")
        .strip_prefix("berth-")
        .expect("a berth job's daemon")
        .to_string();
    // The container job's step ran as root in the job, on the runner's
    // work directory and externals.
    assert_eq!(
        std::fs::read_to_string(runner.join("step.out")).unwrap(),
        "0\nnode\n"
    );
    let built = runner.join("_work/app/app/build.log");
    let md = std::fs::metadata(&built).unwrap();
    assert_eq!((md.uid(), md.gid()), user.ids, "{}", built.display());
    let audit = audited(&fd, &id);
    for want in ["/containers/create", "/exec", "/networks/create"] {
        assert!(
            audit.contains(want),
            "the job was not asked {want}: {audit}"
        );
    }
    // After the round: the job and its bundle are gone.
    assert!(berth_jobs(&fd).is_empty(), "the round's job is left");
    let bundle = PathBuf::from(field("DOCKER_CERT_PATH"));
    assert!(!bundle.exists(), "{} is left", bundle.display());
    drop(fd);
    drop(user);
    let _ = std::fs::remove_dir_all(&base);
}
