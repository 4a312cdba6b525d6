//! Cost of the front door, side by side in one run: the same job's daemon
//! reached through berth (mutual TLS, identity routing, proxy) and through its
//! private unix socket directly, with the real docker CLI.
//!
//! - `docker save` of a 400 MB image to /dev/null;
//! - `docker version` ten times in a row (ten CLI processes, ten handshakes).
//!
//! Runs alternate between the two paths so drift on a shared machine hits
//! both. Run as root: `cargo bench --bench proxy` (BERTH_BENCH_RUNS=N, default 10).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Seconds for `docker <args>` against `env`, output discarded.
fn time(env: &[(&str, String)], args: &[&str]) -> f64 {
    let t = Instant::now();
    let st = Command::new("docker")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "docker {args:?}");
    t.elapsed().as_secs_f64()
}

fn main() {
    if !common::prerequisites() {
        return;
    }
    let runs: usize = std::env::var("BERTH_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let fd = common::FrontDoor::start(42, "bench-proxy");
    let job = fd.create_job(&["--ttl", "1h"]);
    let tls = vec![
        ("DOCKER_HOST", job.endpoint.clone()),
        ("DOCKER_TLS_VERIFY", "1".into()),
        ("DOCKER_CERT_PATH", job.dir.display().to_string()),
    ];
    let sock = format!("/var/lib/bt/bench-proxy/jobs/{}/api/docker.sock", job.id);
    let unix = vec![("DOCKER_HOST", format!("unix://{sock}"))];

    let o = common::docker_tls_stdin(
        &job,
        &["import", "--change", "ENV PATH=/bin", "-", "busybox:test"],
        Some(common::busybox_tar()),
    );
    assert!(o.status.success());
    let ctx = fd.certs.join("big");
    std::fs::create_dir_all(&ctx).unwrap();
    // Random bytes: nothing on the path can compress them away.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test\nRUN head -c 400000000 /dev/urandom > /big\n",
    )
    .unwrap();
    common::docker_tls_ok(&job, &["build", "-q", "-t", "big:1", ctx.to_str().unwrap()]);

    let (mut save_b, mut save_u, mut ver_b, mut ver_u) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        // Alternate which path goes first.
        let order: [(&Vec<(&str, String)>, bool); 2] = if i % 2 == 0 {
            [(&tls, true), (&unix, false)]
        } else {
            [(&unix, false), (&tls, true)]
        };
        for (env, berth) in order {
            let s = time(env, &["save", "big:1"]);
            let t = Instant::now();
            for _ in 0..10 {
                time(env, &["version"]);
            }
            let v = t.elapsed().as_secs_f64();
            if berth {
                save_b.push(s);
                ver_b.push(v);
            } else {
                save_u.push(s);
                ver_u.push(v);
            }
        }
    }
    let (sb, su, vb, vu) = (
        median(&mut save_b),
        median(&mut save_u),
        median(&mut ver_b),
        median(&mut ver_u),
    );
    println!("## berth front door — {runs} runs each, alternating");
    println!();
    println!("| what | through berth (mTLS) | job's unix socket | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| `docker save` of a 400 MB image (s, median) | {sb:.3} | {su:.3} | {:.3} |",
        sb / su
    );
    println!(
        "| `docker version` ×10 (s, median) | {vb:.3} | {vu:.3} | {:.3} |",
        vb / vu
    );
}
