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
#[path = "support/stats.rs"]
mod stats;

use std::time::Instant;

fn main() {
    if !common::prerequisites() {
        return;
    }
    let runs = stats::runs();
    let fd = common::FrontDoor::start(42, "bench-proxy");
    let job = fd.create_job(&["--ttl", "1h"]);
    let tls = vec![
        ("DOCKER_HOST", job.endpoint.clone()),
        ("DOCKER_TLS_VERIFY", "1".into()),
        ("DOCKER_CERT_PATH", job.dir.display().to_string()),
    ];
    let sock = format!("/var/lib/bt/bench-proxy/jobs/{}/api/docker.sock", job.id);
    let unix = vec![("DOCKER_HOST", format!("unix://{sock}"))];

    common::build_big_image(&job, &fd.certs.join("big"));

    let (mut save_b, mut save_u, mut ver_b, mut ver_u) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        // Alternate which path goes first.
        let order: [(&Vec<(&str, String)>, bool); 2] = if i % 2 == 0 {
            [(&tls, true), (&unix, false)]
        } else {
            [(&unix, false), (&tls, true)]
        };
        for (env, berth) in order {
            let s = stats::time_docker(env, &["save", "big:1"]);
            let t = Instant::now();
            for _ in 0..10 {
                stats::time_docker(env, &["version"]);
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
        stats::median(&save_b),
        stats::median(&save_u),
        stats::median(&ver_b),
        stats::median(&ver_u),
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
