//! Sandbox figures, measured side by side in one run (the machines are shared
//! and noisy, so every figure that has a baseline is reported as a ratio to a
//! baseline measured in the same run):
//!
//! - cold start: `Engine::start` until `/_ping` answers;
//! - idle memory: RSS of every process of an idle job;
//! - teardown: `Engine::teardown` of an idle job;
//! - egress: iperf3 from a container in a job to a server in a namespace the
//!   bench creates, against iperf3 over a bare veth from the host to the same
//!   namespace.
//!
//! Run as root: `cargo bench --bench sandbox` (BERTH_BENCH_RUNS=N, default 10).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// An image holding Debian's iperf3 and the libraries it links.
fn iperf_tar() -> Vec<u8> {
    let iperf = Path::new("/usr/bin/iperf3");
    assert!(
        iperf.exists(),
        "/usr/bin/iperf3 is missing: apt-get install iperf3"
    );
    let root = std::env::temp_dir().join(format!("berth-iperf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy(
        std::fs::canonicalize(iperf).unwrap(),
        root.join("bin/iperf3"),
    )
    .unwrap();
    let ldd = Command::new("ldd").arg(iperf).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dst).unwrap();
    }
    let out = Command::new("tar")
        .args(["-C", root.to_str().unwrap(), "-c", "."])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    out.stdout
}

/// Gbit/s reported by an iperf3 client's JSON.
fn gbps(json: &[u8]) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(json).expect("iperf3 json");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

fn iperf_server(outside: &common::Outside) -> std::process::Child {
    let c = Command::new("ip")
        .args([
            "netns",
            "exec",
            &outside.name,
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c
}

fn main() {
    if !common::prerequisites() {
        return;
    }
    let runs = stats::runs();
    let rt = common::rt();
    let e = common::engine(40, "bench");

    let (mut start, mut rss, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let sb = rt.block_on(e.start(None)).unwrap();
        start.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(2));
        rss.push(sb.rss_bytes() as f64 / (1 << 20) as f64);
        let t = Instant::now();
        rt.block_on(e.teardown(sb.id())).unwrap();
        down.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    let outside = common::Outside::create(41);
    let target = outside.addr.to_string();
    let sb = rt.block_on(e.start(None)).unwrap();
    let out = common::docker_stdin(
        &sb.socket(),
        &["import", "-", "iperf:bench"],
        Some(&iperf_tar()),
    );
    assert!(out.status.success(), "import iperf");
    let (mut through_job, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut srv = iperf_server(&outside);
        let out = common::docker(
            &sb.socket(),
            &[
                "run",
                "--rm",
                "iperf:bench",
                "/bin/iperf3",
                "-J",
                "-t",
                "3",
                "-c",
                &target,
            ],
        );
        let _ = srv.wait();
        assert!(
            out.status.success(),
            "iperf3 in the job: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        through_job.push(gbps(&out.stdout));

        let mut srv = iperf_server(&outside);
        let out = Command::new("iperf3")
            .args(["-J", "-t", "3", "-c", &target])
            .output()
            .unwrap();
        let _ = srv.wait();
        bare.push(gbps(&out.stdout));
    }
    rt.block_on(e.teardown(sb.id())).unwrap();

    let mtu = e.mtu();
    println!(
        "## berth sandbox — {runs} runs, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!("| figure | median | p95 |");
    println!("|---|---|---|");
    println!(
        "| cold start to ready `/_ping` (ms) | {:.0} | {:.0} |",
        stats::median(&start),
        stats::pct(&start, 0.95)
    );
    println!(
        "| idle RSS of a job, all processes (MiB) | {:.1} | {:.1} |",
        stats::median(&rss),
        stats::pct(&rss, 0.95)
    );
    println!(
        "| teardown of an idle job (ms) | {:.0} | {:.0} |",
        stats::median(&down),
        stats::pct(&down, 0.95)
    );
    let (j, b) = (stats::median(&through_job), stats::median(&bare));
    println!("| egress, container in a job → other netns (Gbit/s, MTU {mtu}) | {j:.1} | |");
    println!("| egress baseline, host → same netns over a bare veth (Gbit/s) | {b:.1} | |");
    println!("| egress ratio job / bare veth | {:.2} | |", j / b);
}
