//! GitLab CI's custom executor (examples/gitlab) driven as gitlab-runner
//! drives it (tests/drivers/gitlab_custom_executor.py), against a real agent
//! listening where `tcp://docker:2376` reaches it, with pipelines written for
//! a `docker:dind` service.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FrontDoor, berth_bin, prerequisites, require_tools};

/// The tests share test numbers 29 and 38 (uid, address and port pools):
/// one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Panics, naming the fix, when the executor's or the driver's tools are
/// missing.
fn gitlab_prerequisites() -> bool {
    if !prerequisites() {
        return false;
    }
    require_tools(&[
        (&["jq", "--version"][..], "apt-get install jq"),
        (&["unshare", "--version"][..], "apt-get install util-linux"),
        (&["git", "--version"][..], "apt-get install git"),
        (
            &["python3", "-c", "import yaml, tomllib"][..],
            "python 3.11 or later with PyYAML: python3 -m pip install pyyaml",
        ),
    ]);
    true
}

/// A runner host for test `n`: an agent at 127.0.n.1:2376 (where `docker`
/// will point), a config.toml naming examples/gitlab's scripts, and the
/// scripts' settings.
struct Ci {
    fd: Option<FrontDoor>,
    n: u32,
    base: PathBuf,
}

impl Ci {
    fn start(n: u32) -> Ci {
        let name = format!("gl-{n}");
        let base = PathBuf::from(format!("/var/lib/bt/{name}-ci"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let addr = format!("127.0.{n}.1");
        let fd = FrontDoor::start_with(n, &name, |c| {
            c.listen = format!("{addr}:2376").parse().unwrap();
            // The admin CLI in the scripts reaches the agent at this address.
            c.san = vec![addr.clone()];
        });
        let ex = manifest().join("examples/gitlab");
        std::fs::write(
            base.join("config.toml"),
            format!(
                "concurrent = 2\n\n[[runners]]\n  name = \"berth\"\n  url = \"https://gitlab.example\"\n  token = \"TOKEN\"\n  executor = \"custom\"\n  builds_dir = \"/builds\"\n  cache_dir = \"/cache\"\n  [runners.custom]\n    config_exec = \"{ex}/config.sh\"\n    prepare_exec = \"{ex}/prepare.sh\"\n    run_exec = \"{ex}/run.sh\"\n    cleanup_exec = \"{ex}/cleanup.sh\"\n    graceful_kill_timeout = 3\n    force_kill_timeout = 60\n",
                ex = ex.display()
            ),
        )
        .unwrap();
        Ci {
            fd: Some(fd),
            n,
            base,
        }
    }

    fn fd(&self) -> &FrontDoor {
        self.fd.as_ref().expect("the agent runs")
    }

    fn ci_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    fn builds_dir(&self) -> PathBuf {
        self.base.join("builds")
    }

    /// A git repository (a local path) holding `ci_yml` as .gitlab-ci.yml
    /// and the hello app with its base image script.
    fn repo(&self, ci_yml: &str) -> PathBuf {
        let repo = self.base.join("repo");
        let _ = std::fs::remove_dir_all(&repo);
        std::fs::create_dir_all(repo.join("pipelines")).unwrap();
        let cp = |from: &str| {
            let out = Command::new("cp")
                .arg("-a")
                .arg(manifest().join(from))
                .arg(repo.join("pipelines"))
                .output()
                .unwrap();
            assert!(out.status.success(), "cp {from}");
        };
        cp("pipelines/scripts");
        cp("pipelines/apps");
        std::fs::write(repo.join(".gitlab-ci.yml"), ci_yml).unwrap();
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(["-c", "user.name=ci", "-c", "user.email=ci@example"])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        git(&["init", "-q", "-b", "main"]);
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "pipeline"]);
        repo
    }

    /// Starts the driver on `job` of the repository's .gitlab-ci.yml.
    fn driver(&self, repo: &Path, job: &str, job_id: u32, extra: &[&str]) -> Driver {
        let bin_dir = berth_bin().parent().unwrap().to_path_buf();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("python3");
        c.arg(manifest().join("tests/drivers/gitlab_custom_executor.py"))
            .arg("--config")
            .arg(self.base.join("config.toml"))
            .arg("--ci-file")
            .arg(repo.join(".gitlab-ci.yml"))
            .arg("--repo")
            .arg(repo)
            .args(["--job", job, "--job-id", &job_id.to_string()])
            .args(["--project-path", "group/app"])
            .args(extra)
            // The runner's own environment: the scripts' settings.
            .env("PATH", path)
            .env("BERTH_ENDPOINT", format!("127.0.{}.1:2376", self.n))
            .env("BERTH_CERTS_DIR", &self.fd().certs)
            .env("BERTH_CI_DIR", self.ci_dir())
            .env("BERTH_BUILDS_DIR", self.builds_dir())
            .env("BERTH_CACHE_DIR", self.base.join("cache"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("python3");
        let out = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("[ci {job_id}] {line}");
                l.lock().unwrap().push_str(&line);
                l.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        Driver { child, lines, log }
    }

    /// The berth jobs the agent has, with their labels.
    fn berth_jobs(&self) -> Vec<serde_json::Value> {
        let out = self.fd().job_cli(&["ls", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Nothing of CI job `job_id` is left: no berth job, no bundle, no
    /// builds directory.
    fn assert_cleaned_up(&self, job_id: u32) {
        if self.fd.is_some() {
            let jobs = self.berth_jobs();
            assert!(jobs.is_empty(), "berth jobs left: {jobs:?}");
        }
        let dir = self.ci_dir().join(job_id.to_string());
        assert!(!dir.exists(), "{} is left", dir.display());
        let builds = self.builds_dir().join(job_id.to_string());
        assert!(!builds.exists(), "{} is left", builds.display());
    }
}

impl Drop for Ci {
    fn drop(&mut self) {
        drop(self.fd.take());
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

struct Driver {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Driver {
    /// Waits for a line containing `what`; fails if the driver ends first.
    fn wait_for(&self, what: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(900)) {
                Ok(l) if l.contains(what) => return,
                Ok(_) => {}
                Err(e) => panic!("no line {what:?} ({e}):\n{}", self.log()),
            }
        }
    }

    fn resume(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the driver; returns its exit code and the RESULT it printed.
    fn finish(mut self) -> (i32, String, String) {
        let status = self.child.wait().unwrap();
        // The reader thread ends with the pipe.
        while self.lines.recv().is_ok() {}
        let log = self.log();
        let result = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or("none")
            .to_string();
        (status.code().unwrap_or(-1), result, log)
    }
}

/// The variables GitLab's documentation gives a `docker:dind` pipeline.
const DIND_VARIABLES: &str = "variables:\n  DOCKER_HOST: tcp://docker:2376\n  DOCKER_TLS_CERTDIR: \"/certs\"\n  DOCKER_TLS_VERIFY: 1\n  DOCKER_CERT_PATH: \"$DOCKER_TLS_CERTDIR/client\"\n";

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_dind_pipeline_builds_runs_and_reaches_its_published_port() {
    if !gitlab_prerequisites() {
        return;
    }
    let _serial = lock();
    let ci = Ci::start(29);
    // examples/gitlab/.gitlab-ci.yml as it stands, on the hello app.
    let yml = std::fs::read_to_string(manifest().join("examples/gitlab/.gitlab-ci.yml")).unwrap();
    let repo = ci.repo(&yml);
    let mut d = ci.driver(&repo, "build", 1001, &["--pause-after", "step_script"]);
    d.wait_for("paused after step_script");
    let jobs = ci.berth_jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["labels"]["gitlab-job"], "1001", "{jobs:?}");
    assert_eq!(jobs[0]["labels"]["gitlab-project"], "group/app", "{jobs:?}");
    d.resume();
    let (code, result, log) = d.finish();
    assert_eq!((code, result.as_str()), (0, "success"), "{log}");
    assert!(
        log.contains("Using Custom executor with driver berth"),
        "{log}"
    );
    assert!(log.contains("PASS: 3 checks"), "{log}");
    assert!(log.contains("the app answers at docker:"), "{log}");
    ci.assert_cleaned_up(1001);
}

#[test]
fn a_failing_step_is_a_build_failure_and_cleanup_runs() {
    if !gitlab_prerequisites() {
        return;
    }
    let _serial = lock();
    let ci = Ci::start(29);
    let yml = format!(
        "{DIND_VARIABLES}\ntest:\n  services: [docker:dind]\n  script:\n    - docker version --format 'server {{{{.Server.Version}}}}'\n    - exit 3\n    - echo not reached\n  after_script:\n    - echo \"after_script sees $CI_JOB_STATUS\"\n"
    );
    let repo = ci.repo(&yml);
    let (code, result, log) = ci.driver(&repo, "test", 1002, &[]).finish();
    assert_eq!((code, result.as_str()), (1, "build_failure"), "{log}");
    assert!(log.contains("server 2"), "{log}");
    assert!(!log.contains("\nnot reached"), "{log}");
    assert!(log.contains("after_script sees failed"), "{log}");
    ci.assert_cleaned_up(1002);
}

#[test]
fn an_agent_gone_after_prepare_is_a_system_failure() {
    if !gitlab_prerequisites() {
        return;
    }
    let _serial = lock();
    let mut ci = Ci::start(38);
    let yml = format!(
        "{DIND_VARIABLES}\ntest:\n  services: [docker:dind]\n  script:\n    - docker info\n"
    );
    let repo = ci.repo(&yml);
    let mut d = ci.driver(&repo, "test", 1003, &["--pause-after", "prepare_exec"]);
    d.wait_for("paused after prepare_exec");
    assert_eq!(ci.berth_jobs().len(), 1);
    // The agent stops: its jobs go with it, and nothing answers at docker:2376.
    drop(ci.fd.take());
    d.resume();
    let (code, result, log) = d.finish();
    assert_eq!((code, result.as_str()), (2, "system_failure"), "{log}");
    assert!(log.contains("does not answer"), "{log}");
    // cleanup_exec ran all the same.
    ci.assert_cleaned_up(1003);
}

#[test]
fn a_canceled_job_is_cleaned_up() {
    if !gitlab_prerequisites() {
        return;
    }
    let _serial = lock();
    let ci = Ci::start(29);
    let marker = ci.base.join("step-started");
    let yml = format!(
        "{DIND_VARIABLES}\ntest:\n  services: [docker:dind]\n  script:\n    - pipelines/scripts/busybox-base.sh hello-base:1\n    - docker run -d --name before hello-base:1 sleep 600\n    - touch \"$STEP_MARKER\"\n    - docker run --rm hello-base:1 sleep 600\n"
    );
    let repo = ci.repo(&yml);
    let d = ci.driver(
        &repo,
        "test",
        1004,
        &["--var", &format!("STEP_MARKER={}", marker.display())],
    );
    // Bounded wait for the step to reach its long command.
    for _ in 0..3000 {
        if marker.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(marker.exists(), "the step never started:\n{}", d.log());
    assert_eq!(ci.berth_jobs().len(), 1);
    // Canceled in GitLab's UI: the runner is told, as by SIGTERM here.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, result, log) = d.finish();
    assert_eq!((code, result.as_str()), (3, "canceled"), "{log}");
    ci.assert_cleaned_up(1004);
}

#[test]
fn two_ci_jobs_at_once_get_two_berth_jobs_and_see_only_their_own() {
    if !gitlab_prerequisites() {
        return;
    }
    let _serial = lock();
    let ci = Ci::start(29);
    let out = ci.base.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Each job makes a volume, waits until the other made its own, then
    // looks: at its daemon, its certificates and the executor's directory.
    let yml = format!(
        "{DIND_VARIABLES}\ntest:\n  services: [docker:dind]\n  script:\n    - docker volume create \"vol-$CI_JOB_ID\"\n    - touch \"$OUT/ready-$CI_JOB_ID\"\n    - for i in $(seq 1 3000); do [ -e \"$OUT/ready-$OTHER\" ] && break; sleep 0.2; done\n    - docker info --format '{{{{.ID}}}}' > \"$OUT/id-$CI_JOB_ID\"\n    - docker volume ls -q > \"$OUT/volumes-$CI_JOB_ID\"\n    - sha256sum < \"$DOCKER_CERT_PATH/cert.pem\" > \"$OUT/cert-$CI_JOB_ID\"\n    - ls -A \"$BERTH_CI_DIR\" > \"$OUT/ci-dir-$CI_JOB_ID\"\n"
    );
    let repo = ci.repo(&yml);
    let vars = |other: u32| {
        vec![
            "--var".to_string(),
            format!("OUT={}", out.display()),
            "--var".to_string(),
            format!("OTHER={other}"),
            "--var".to_string(),
            format!("BERTH_CI_DIR={}", ci.ci_dir().display()),
            "--pause-after".to_string(),
            "step_script".to_string(),
        ]
    };
    let (va, vb) = (vars(2002), vars(2001));
    let va: Vec<&str> = va.iter().map(String::as_str).collect();
    let vb: Vec<&str> = vb.iter().map(String::as_str).collect();
    let mut a = ci.driver(&repo, "test", 2001, &va);
    let mut b = ci.driver(&repo, "test", 2002, &vb);
    a.wait_for("paused after step_script");
    b.wait_for("paused after step_script");
    let mut ids: Vec<String> = ci
        .berth_jobs()
        .iter()
        .map(|j| j["labels"]["gitlab-job"].as_str().unwrap_or("").to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["2001", "2002"]);
    a.resume();
    b.resume();
    for (d, id) in [(a, 2001), (b, 2002)] {
        let (code, result, log) = d.finish();
        assert_eq!((code, result.as_str()), (0, "success"), "job {id}: {log}");
    }
    let read =
        |what: &str, id: u32| std::fs::read_to_string(out.join(format!("{what}-{id}"))).unwrap();
    assert_ne!(read("id", 2001).trim(), "");
    assert_ne!(
        read("id", 2001),
        read("id", 2002),
        "one daemon for two CI jobs"
    );
    assert_ne!(
        read("cert", 2001),
        read("cert", 2002),
        "one bundle for two CI jobs"
    );
    for id in [2001, 2002] {
        assert_eq!(read("volumes", id).trim(), format!("vol-{id}"));
        assert_eq!(
            read("ci-dir", id).trim(),
            "",
            "a stage sees the executor's bundles"
        );
    }
    ci.assert_cleaned_up(2001);
    ci.assert_cleaned_up(2002);
}
