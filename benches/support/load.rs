//! The front door under load: 200 clients across 20 jobs of one agent
//! (`berth serve`, a process of its own) for BERTH_BENCH_LOAD_SECS (300
//! by default), the clients of tests/common/load.rs. Per job:
//!
//! - 3 `_ping` clients, a ping every 100 ms each;
//! - 3 `logs -f` of a container that prints a line every 100 ms;
//! - 2 `events` streams;
//! - 2 `exec` sessions of `cat` with stdin, a line written every 200 ms
//!   and read back.
//!
//! The baseline, in the same run before the load: one `_ping` client on
//! one of the same jobs, a ping every 10 ms, nothing else running. Then:
//! `_ping` p50 and p99 under load against that, as ratios; clients whose
//! connection failed or ended before the time was up (a stream that ends,
//! a ping that fails, an echo that does not come back, an events stream
//! that does not see its job's execs end after the load); the agent's RSS
//! and descriptors idle, a fifth of the way, at most, at the end and after
//! the clients left; the CPU the host, the agent and the clients used.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::load::{Mix, client, pinger};
use crate::stats::{median, pct};

const JOBS: usize = 20;
const MIX: Mix = Mix {
    pingers: 3,
    followers: 3,
    watchers: 2,
    execs: 2,
};
const NAME: &str = "bs-load";

pub fn figures(table: &mut Vec<String>) {
    let secs: u64 = std::env::var("BERTH_BENCH_LOAD_SECS")
        .ok()
        .map(|v| {
            v.parse()
                .expect("BERTH_BENCH_LOAD_SECS is a number of seconds")
        })
        .unwrap_or(300);
    // Above every test's ids (1.6e9 + n·8·65536, n < 128) and the density
    // section's (1.7e9 + 300 ranges).
    let cfg = PathBuf::from(format!("/var/lib/bt/{NAME}.toml"));
    std::fs::create_dir_all("/var/lib/bt").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[sandbox]\nstate_dir = \"/var/lib/bt/{NAME}\"\nuid_base = 1750000000\nuid_ranges = {}\n\
             net_pool = \"10.216.0.0\"\nnet_pool_prefix = 24\nports_per_job = 0\n\
             dns_upstreams = [\"127.0.0.1:9\"]\n[serve]\nwarm_pool = 0\n",
            JOBS + 4
        ),
    )
    .unwrap();
    let certs = PathBuf::from(format!("/var/lib/bt/{NAME}-certs"));
    let _ = std::fs::remove_dir_all(&certs);
    let mut agent = common::Agent::start(
        &cfg,
        &certs,
        Path::new(&format!("/var/lib/bt/{NAME}-agent.log")),
    );
    let jobs: Vec<common::TlsJob> = (0..JOBS)
        .map(|_| {
            let job = agent.create(&["--ttl", "2h"]);
            common::load::prepare(&job);
            job
        })
        .collect();
    let endpoint = agent.endpoint();
    let rt = common::rt();
    std::thread::sleep(Duration::from_secs(5));
    let idle = common::footprint(agent.pid());

    let baseline = rt
        .block_on(pinger(
            client(&jobs[0], &endpoint),
            Duration::from_millis(10),
            Instant::now() + Duration::from_secs(20),
        ))
        .expect("idle pings");
    let baseline = &baseline[50.min(baseline.len() / 2)..];

    let cpu_before = (
        crate::cpu_ticks(agent.pid()),
        crate::cpu_ticks(std::process::id()),
        host_ticks(),
    );
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(secs);
    let (load, samples) = rt.block_on(async {
        // The agent's footprint every 5 s while the clients run.
        let pid = agent.pid();
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                samples.push(common::footprint(pid));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            samples
        });
        let load = common::load::run(&jobs, &endpoint, MIX, until).await;
        (load, sampler.await.unwrap())
    });
    let took = t0.elapsed().as_secs_f64();
    let cores = |ticks: u64, before: u64| ticks.saturating_sub(before) as f64 / 100.0 / took;
    let agent_cores = cores(crate::cpu_ticks(agent.pid()), cpu_before.0);
    let client_cores = cores(crate::cpu_ticks(std::process::id()), cpu_before.1);
    let host_cores = cores(host_ticks(), cpu_before.2);
    std::thread::sleep(Duration::from_secs(10));
    let after = common::footprint(agent.pid());
    for job in &jobs {
        agent.remove(job);
    }
    agent.stop();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let (p50i, p99i) = (median(baseline), pct(baseline, 0.99));
    let (p50l, p99l) = (median(&load.pings), pct(&load.pings, 0.99));
    let clients = JOBS * MIX.per_job();
    crate::row(
        table,
        format!(
            "| front door, {clients} clients on {JOBS} jobs for {secs} s: `_ping` p50 / p99 (µs), idle → under load | {p50i:.0} / {p99i:.0} → {p50l:.0} / {p99l:.0} | ratios {:.2}× / {:.2}× |",
            p50l / p50i,
            p99l / p99i
        ),
    );
    crate::row(
        table,
        format!(
            "| same: clients dropped; pings, log lines, events, exec echoes | {} of {clients} | {}, {}, {}, {} |",
            load.dropped,
            load.pings.len(),
            load.lines,
            load.events,
            load.echoes
        ),
    );
    // The agent's memory early in the load (a fifth of the way), at its
    // most, and at the end: bounded is flat from early on.
    let early = samples[samples.len() / 5];
    let last = *samples.last().unwrap();
    let most = (
        samples.iter().map(|s| s.rss).max().unwrap(),
        samples.iter().map(|s| s.fds).max().unwrap(),
    );
    crate::row(
        table,
        format!(
            "| same: the agent's RSS (MiB), idle → a fifth of the way → at most → at the end → clients gone | {:.1} → {:.1} → {:.1} → {:.1} → {:.1} | fds {} → {} → {} → {} → {} |",
            mib(idle.rss),
            mib(early.rss),
            mib(most.0),
            mib(last.rss),
            mib(after.rss),
            idle.fds,
            early.fds,
            most.1,
            last.fds,
            after.fds
        ),
    );
    crate::row(
        table,
        format!(
            "| same: CPU (cores) of the host / the agent / the clients (this process) | {host_cores:.2} / {agent_cores:.2} / {client_cores:.2} | of {} |",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
    );
}

/// The host's busy time in ticks: every CPU's time but idle and iowait
/// (`/proc/stat`).
pub fn host_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    f.iter().take(8).sum::<u64>() - f[3] - f[4]
}
