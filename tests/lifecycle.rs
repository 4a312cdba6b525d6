//! A job's life as the agent's books tell it, through the real front door and
//! the real CLIs: a job leaves `job ls` only once its last trace is gone, a
//! job whose dockerd stops answering says so and its clients get a clear
//! error, what an earlier agent left is recovered while the agent serves, and
//! the warm pool never costs a job its id range.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `job ls` until `pred` holds for its output; panics with the last
/// output after `bound` (a bound on failure only, never a timing claim).
fn ls_until(fd: &FrontDoor, bound: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let o = fd.job_cli(&["ls"]);
        let text = format!("{}{}", out(&o), err(&o));
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "job ls never showed {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A file the kernel refuses to delete (`chattr +i`) in a job's directory:
/// the job's teardown cannot finish until it is released.
struct Pin(PathBuf);

impl Pin {
    fn new(job_dir: &Path) -> Pin {
        let p = job_dir.join("pin");
        std::fs::write(&p, "held").unwrap();
        let o = Command::new("chattr").arg("+i").arg(&p).output().unwrap();
        assert!(
            o.status.success(),
            "chattr +i (e2fsprogs) on {}: {}",
            p.display(),
            err(&o)
        );
        Pin(p)
    }

    fn release(&self) {
        let o = Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "chattr -i: {}", err(&o));
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}

fn dockerd_of(engine: &berth::sandbox::Engine, id: &str) -> i32 {
    engine
        .get(id)
        .expect("live job")
        .pids()
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "dockerd")
                .unwrap_or(false)
        })
        .expect("dockerd in the job") as i32
}

#[test]
fn a_job_that_cannot_be_removed_stays_listed_and_is_retried_until_gone() {
    if !prerequisites() {
        return;
    }
    let engine = Arc::new(engine(59, "books"));
    let fd = FrontDoor::start_engine(engine.clone(), "books", |_| {});
    let job = fd.create_job(&[]);
    let sb = engine.get(&job.id).unwrap();
    let traces = Traces::capture(&engine, &sb);
    let pin = Pin::new(&engine.config().state_dir.join("jobs").join(&job.id));

    let rm = fd.job_cli(&["rm", &job.id]);
    assert!(!rm.status.success(), "job rm said done: {}", out(&rm));
    assert!(err(&rm).contains("teardown"), "{}", err(&rm));
    // Still in the books, with the reason; its certificate opens nothing.
    let ls = ls_until(&fd, Duration::from_secs(5), "the stuck job", |t| {
        t.contains(&job.id)
    });
    assert!(ls.contains("teardown-failed"), "{ls}");
    assert!(
        ls.contains("cannot remove"),
        "the reason says what is stuck: {ls}"
    );
    let v = docker_tls(&job, &["version"]);
    assert!(!v.status.success());
    assert!(err(&v).contains("has ended"), "{}", err(&v));

    // Once the obstacle goes, a retry finishes the job without anyone asking.
    pin.release();
    ls_until(&fd, Duration::from_secs(120), "the job gone", |t| {
        !t.contains(&job.id)
    });
    traces.assert_gone();
    assert!(engine.stuck().is_empty());
}

#[test]
fn what_an_earlier_agent_left_is_recovered_while_the_agent_serves() {
    if !prerequisites() {
        return;
    }
    let cfg = engine_config(60, "left-behind");
    // An agent starts a job and dies without tearing it down.
    let (left, traces) = {
        let rt = rt();
        let e = berth::sandbox::Engine::new(cfg.clone()).unwrap();
        let sb = rt.block_on(e.start(None)).unwrap();
        let traces = Traces::capture(&e, &sb);
        (sb.id().to_string(), traces)
    };
    let pin = Pin::new(&cfg.state_dir.join("jobs").join(&left));

    let engine = Arc::new(berth::sandbox::Engine::new(cfg.clone()).unwrap());
    let fd = FrontDoor::start_engine(engine.clone(), "left-behind", |_| {});
    // The next agent serves while the left job resists: it is listed as
    // failing, and new jobs work.
    let ls = ls_until(&fd, Duration::from_secs(60), "the left job", |t| {
        t.contains(&left)
    });
    assert!(ls.contains("teardown-failed"), "{ls}");
    let job = fd.create_job(&[]);
    docker_tls_ok(&job, &["version"]);

    pin.release();
    ls_until(&fd, Duration::from_secs(120), "the left job gone", |t| {
        !t.contains(&left)
    });
    traces.assert_gone();
}

#[test]
fn a_hung_dockerd_makes_its_job_unhealthy_and_its_clients_get_a_clear_error() {
    if !prerequisites() {
        return;
    }
    let engine = Arc::new(
        berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
            health_interval: Duration::from_millis(500),
            ..engine_config(61, "hung")
        })
        .unwrap(),
    );
    let fd = FrontDoor::start_engine(engine.clone(), "hung", |_| {});
    let job = fd.create_job(&[]);
    let other = fd.create_job(&[]);
    let dockerd = nix::unistd::Pid::from_raw(dockerd_of(&engine, &job.id));
    nix::sys::signal::kill(dockerd, nix::sys::signal::Signal::SIGSTOP).unwrap();

    // A client already waiting on the stopped daemon is answered, not left
    // hanging.
    let waiting = {
        let job = job.clone();
        std::thread::spawn(move || docker_tls(&job, &["version"]))
    };
    let ls = ls_until(&fd, Duration::from_secs(120), "the job unhealthy", |t| {
        t.contains("unhealthy")
    });
    assert!(ls.contains("/_ping"), "{ls}");
    let v = waiting.join().unwrap();
    assert!(!v.status.success());
    assert!(err(&v).contains("unhealthy"), "{}", err(&v));
    let v = docker_tls(&job, &["version"]);
    assert!(!v.status.success());
    assert!(err(&v).contains("unhealthy"), "{}", err(&v));
    // Other jobs are served as usual.
    docker_tls_ok(&other, &["version"]);

    // It recovers when its daemon answers again.
    nix::sys::signal::kill(dockerd, nix::sys::signal::Signal::SIGCONT).unwrap();
    ls_until(
        &fd,
        Duration::from_secs(120),
        "the job running again",
        |t| !t.contains("unhealthy"),
    );
    docker_tls_ok(&job, &["version"]);

    // A stopped daemon does not hold its teardown.
    nix::sys::signal::kill(dockerd, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let traces = Traces::capture(&engine, &engine.get(&job.id).unwrap());
    let rm = fd.job_cli(&["rm", &job.id]);
    assert!(rm.status.success(), "job rm: {}", err(&rm));
    traces.assert_gone();
}

#[test]
fn the_warm_pool_never_costs_a_job_its_id_range() {
    if !prerequisites() {
        return;
    }
    let engine = Arc::new(
        berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
            uid_ranges: 3,
            ..engine_config(62, "pool-ranges")
        })
        .unwrap(),
    );
    let fd = FrontDoor::start_engine(engine.clone(), "pool-ranges", |c| c.warm_pool = 2);
    // Three jobs in a row on three ranges, whatever the pool is doing.
    let jobs: Vec<TlsJob> = (0..3).map(|_| fd.create_job(&[])).collect();
    for j in &jobs {
        docker_tls_ok(j, &["version"]);
    }
    // A fourth is refused for lack of a range, and says so.
    let o = Command::new(berth_bin())
        .args(["job", "create", "--endpoint", &fd.endpoint()])
        .arg("--certs-dir")
        .arg(&fd.certs)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(err(&o).contains("no free job slot"), "{}", err(&o));

    // A job with its own limits gets the range a warm sandbox holds.
    let rm = fd.job_cli(&["rm", &jobs[0].id]);
    assert!(rm.status.success(), "{}", err(&rm));
    ls_until(&fd, Duration::from_secs(120), "a warm sandbox", |t| {
        t.contains("warm pool: 1")
    });
    let custom = fd.create_job(&["--memory-bytes", &(512u64 << 20).to_string()]);
    docker_tls_ok(&custom, &["version"]);
    let cg = engine.get(&custom.id).unwrap().record().cgroup.unwrap();
    assert_eq!(cg.memory_limit(), Some(512 << 20));
}
