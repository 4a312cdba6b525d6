//! berth on a systemd host with pure cgroup v2, with the shipped units: jobs
//! live in berth.service's delegated subtree, survive daemon-reload and other
//! units starting, and nothing is left after `systemctl restart`, `kill -9`
//! of the agent or `systemctl stop`; `berth doctor` proves delegation and
//! names the fix when there is none.
//!
//! Runs only in the cgroup v2 guest (`scripts/guest/run`, from `.ci/run`):
//! it installs units and restarts services, so `cargo test` leaves it out
//! (`test = false`) and it fails at once anywhere but such a guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const STATE: &str = "/var/lib/berth";
const CERTS: &str = "/etc/berth/certs";
const ENDPOINT: &str = "127.0.0.1:2376";

fn sh(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).output().unwrap()
}

fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "`{cmd}` failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// This suite proves nothing elsewhere: it fails loudly outside the guest.
fn in_the_v2_guest() {
    let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    assert_eq!(
        init.trim(),
        "systemd",
        "this suite runs in the systemd guest (scripts/guest/run)"
    );
    let fs = ok("stat -fc %T /sys/fs/cgroup");
    assert_eq!(fs.trim(), "cgroup2fs", "this suite needs pure cgroup v2");
}

/// Installs the shipped units and binary and a configuration, as the
/// README says, then starts the socket.
fn install() {
    let repo = repo();
    std::fs::create_dir_all("/etc/berth").unwrap();
    std::fs::copy(berth_bin(), "/usr/local/bin/berth").unwrap();
    for unit in ["berth.socket", "berth.service"] {
        std::fs::copy(
            repo.join("deploy/systemd").join(unit),
            Path::new("/etc/systemd/system").join(unit),
        )
        .unwrap();
    }
    std::fs::write(
        "/etc/berth/berth.toml",
        format!(
            "[serve]\ncerts_dir = {CERTS:?}\nwarm_pool = 1\n\
             [sandbox]\nstate_dir = {STATE:?}\ndns_upstreams = [\"127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    ok("systemctl daemon-reload && systemctl start berth.socket");
    // The first connection starts the agent (socket activation); it makes
    // its CA and the admin bundle at first start.
    drop(std::net::TcpStream::connect(ENDPOINT).expect("berth.socket listens"));
    wait_until("the agent writes its admin bundle", || {
        Path::new(CERTS).join("admin/key.pem").exists()
    });
}

fn repo() -> PathBuf {
    std::env::var_os("BERTH_TEST_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

fn berth(args: &[&str]) -> Output {
    Command::new("/usr/local/bin/berth")
        .args(args)
        .env("BERTH_ENDPOINT", ENDPOINT)
        .env("BERTH_CERTS_DIR", CERTS)
        .output()
        .unwrap()
}

fn berth_ok(args: &[&str]) -> String {
    let o = berth(args);
    assert!(
        o.status.success(),
        "berth {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits (bounded) until `f` holds; the bound is generous: this is a slow
/// emulated machine, and no assertion depends on how long it took.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(600);
    while !f() {
        assert!(Instant::now() < end, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn create_job() -> TlsJob {
    let dir = PathBuf::from(format!("/var/lib/bt-systemd-job-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = berth_ok(&["job", "create", "--json", "--out", dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("job create --json");
    TlsJob {
        endpoint: format!("tcp://{ENDPOINT}"),
        ..TlsJob::from_create_json(&v, dir)
    }
}

fn service_cgroup() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/system.slice/berth.service")
}

fn main_pid() -> u32 {
    ok("systemctl show -p MainPID --value berth.service")
        .trim()
        .parse()
        .unwrap()
}

/// Nothing of job `id` on the host: cgroups, link, rules, state, slot.
fn assert_job_gone(id: &str) {
    let cg = ok(&format!("find /sys/fs/cgroup -type d -name {id}"));
    assert!(cg.trim().is_empty(), "cgroups of {id} left: {cg}");
    let links = ok("ip -o link");
    assert!(!links.contains(&id[..12]), "link of {id} left: {links}");
    let rules = ok("iptables-save");
    assert!(!rules.contains(id), "rules of {id} left");
    assert!(
        !Path::new(STATE).join("jobs").join(id).exists(),
        "state of {id} left"
    );
    let slots = ok(&format!("grep -rl {id} {STATE}/slots || true"));
    assert!(slots.trim().is_empty(), "slot of {id} left");
}

#[test]
fn the_shipped_units_run_jobs_in_berth_services_delegated_subtree() {
    in_the_v2_guest();
    install();

    // Socket activation starts the agent at the first connection.
    let job = create_job();
    let home = service_cgroup();
    let agent_leaf = std::fs::read_to_string(home.join("agent/cgroup.procs")).unwrap();
    assert!(
        agent_leaf
            .lines()
            .any(|p| p.trim() == main_pid().to_string()),
        "the agent sits in its leaf: {agent_leaf}"
    );
    let job_cg = home.join("berth").join(&job.id);
    let init_leaf = std::fs::read_to_string(job_cg.join("job/init/cgroup.procs")).unwrap();
    assert!(
        !init_leaf.trim().is_empty(),
        "the job's processes are in job/init"
    );
    assert_eq!(
        std::fs::read_to_string(job_cg.join("memory.max"))
            .unwrap()
            .trim(),
        (4u64 << 30).to_string(),
        "the whole-job limit sits on the root-owned parent"
    );

    // Full Docker in the job: a container, its cgroup inside the job's.
    import_busybox_tls(&job);
    docker_tls_ok(
        &job,
        &[
            "run",
            "-d",
            "--name",
            "sleeper",
            "--memory",
            "64m",
            "busybox:test",
            "sleep",
            "600",
        ],
    );
    let cid = docker_tls_ok(&job, &["inspect", "-f", "{{.Id}}", "sleeper"]);
    let mem = job_cg
        .join("job/docker")
        .join(cid.trim())
        .join("memory.max");
    assert_eq!(
        std::fs::read_to_string(&mem).unwrap().trim(),
        (64u64 << 20).to_string()
    );

    // Other units starting and a daemon-reload leave the job alone.
    ok("systemctl daemon-reload");
    ok("systemd-run --unit berth-test-neighbour --wait --quiet true");
    ok("systemctl daemon-reload");
    assert!(docker_tls_ok(&job, &["top", "sleeper"]).contains("sleep 600"));
    let ctl = std::fs::read_to_string(home.join("cgroup.subtree_control")).unwrap();
    assert!(ctl.contains("memory") && ctl.contains("pids"), "{ctl}");
    assert_eq!(
        std::fs::read_to_string(&mem).unwrap().trim(),
        (64u64 << 20).to_string(),
        "a reload kept the container's limit"
    );

    // The warm pool filled, in the same subtree.
    wait_until("the warm pool fills", || {
        berth_ok(&["job", "ls"]).contains("warm pool: 1 of 1 ready")
    });

    // `systemctl restart` with a running container leaves nothing of the job.
    ok("systemctl restart berth.service");
    assert_job_gone(&job.id);

    // kill -9 of the agent: systemd restarts it, it tears the rest down.
    let job = create_job();
    import_busybox_tls(&job);
    docker_tls_ok(&job, &["run", "-d", "busybox:test", "sleep", "600"]);
    let old = main_pid();
    ok(&format!("kill -9 {old}"));
    wait_until("systemd restarts the agent", || {
        sh("systemctl is-active --quiet berth.service")
            .status
            .success()
            && main_pid() != old
            && main_pid() != 0
    });
    // Recovery runs at start; the next job proves the agent serves again.
    let next = create_job();
    assert_job_gone(&job.id);
    berth_ok(&["job", "rm", &next.id]);
    assert_job_gone(&next.id);

    // `systemctl stop` ends everything, the delegated subtree included.
    let last = create_job();
    ok("systemctl stop berth.service berth.socket");
    assert_job_gone(&last.id);
    assert!(!home.exists(), "berth.service's cgroup is gone after stop");
    // (Each job's link was checked above; links of other suites' agents
    // are theirs to account for.)
}

#[test]
fn doctor_proves_delegation_and_names_the_fix_without_it() {
    in_the_v2_guest();
    let doctor = |scope: bool| {
        let mut c = Command::new(berth_bin());
        c.args([
            "doctor",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "/var/lib/bt/doctor",
        ]);
        if !scope {
            // As if it had already asked systemd: it stays in this
            // service's own, undelegated cgroup.
            c.env("BERTH_DELEGATED_SCOPE", "1");
        }
        c.output().unwrap()
    };
    // From an undelegated service (this suite's): the agent asks systemd for
    // a delegated scope and proves a job cgroup works there.
    let o = doctor(true);
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("cgroups"))
        .unwrap_or("");
    assert!(
        line.contains("ok")
            && line.contains("v2, jobs below /system.slice/")
            && line.contains("job/init"),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Without the scope, it fails and says what to do.
    let o = doctor(false);
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("not delegated") && text.contains("Delegate=yes"),
        "{text}"
    );
}
