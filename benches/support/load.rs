//! The front door under load: 200 clients across 20 jobs of one agent
//! (`berth serve`, a process of its own) for BERTH_BENCH_LOAD_SECS (300
//! by default), each a bollard client with its own connections, as CI
//! tools hold them. Per job:
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::common;
use crate::stats::{median, pct};

const JOBS: usize = 20;
const PINGERS: usize = 3;
const FOLLOWERS: usize = 3;
const WATCHERS: usize = 2;
const EXECS: usize = 2;
const CLIENTS: usize = JOBS * (PINGERS + FOLLOWERS + WATCHERS + EXECS);
const NAME: &str = "bs-load";

/// What the clients did and what broke, shared by all of them.
#[derive(Default)]
struct Tally {
    pings: AtomicU64,
    lines: AtomicU64,
    events: AtomicU64,
    echoes: AtomicU64,
    dropped: AtomicU64,
}

/// The agent's resident memory and open descriptors.
fn footprint(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = common::kib_field(&status, "VmRSS").expect("VmRSS") * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    (rss, fds)
}

fn client(job: &common::TlsJob, endpoint: &str) -> bollard::Docker {
    bollard::Docker::connect_with_ssl(
        endpoint,
        &job.dir.join("key.pem"),
        &job.dir.join("cert.pem"),
        &job.dir.join("ca.pem"),
        30,
        bollard::API_DEFAULT_VERSION,
    )
    .unwrap()
}

/// Pings every `every` until `until`; the latencies in µs, or None when a
/// ping failed.
async fn pinger(docker: bollard::Docker, every: Duration, until: Instant) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until {
        tick.tick().await;
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(30), docker.ping()).await {
            Ok(Ok(_)) => out.push(t.elapsed().as_secs_f64() * 1e6),
            _ => return None,
        }
    }
    Some(out)
}

/// `logs -f` until `until`: false when the stream failed or ended first,
/// or never carried a line.
async fn follower(docker: bollard::Docker, until: Instant, tally: Arc<Tally>) -> bool {
    let opts = bollard::query_parameters::LogsOptions {
        follow: true,
        stdout: true,
        tail: "0".into(),
        ..Default::default()
    };
    let mut logs = docker.logs("talker", Some(opts));
    let mut lines = 0;
    loop {
        tokio::select! {
            item = logs.next() => match item {
                Some(Ok(_)) => lines += 1,
                _ => return false,
            },
            _ = tokio::time::sleep_until(until.into()) => break,
        }
    }
    tally.lines.fetch_add(lines, Ordering::Relaxed);
    lines > 0
}

/// `events` from before the load until its job's execs have ended after
/// it (`exec_die`, one per exec session): false when the stream failed
/// or ended first, or the ends never came.
async fn watcher(docker: bollard::Docker, until: Instant, tally: Arc<Tally>) -> bool {
    let mut events = docker.events(None::<bollard::query_parameters::EventsOptions>);
    let (mut seen, mut died) = (0, 0);
    let give_up = until + Duration::from_secs(120);
    while died < EXECS {
        tokio::select! {
            item = events.next() => match item {
                Some(Ok(e)) => {
                    seen += 1;
                    if e.action.as_deref().is_some_and(|a| a.starts_with("exec_die")) {
                        died += 1;
                    }
                }
                _ => return false,
            },
            _ = tokio::time::sleep_until(give_up.into()) => return false,
        }
    }
    tally.events.fetch_add(seen, Ordering::Relaxed);
    true
}

/// `exec -i cat`: a line every 200 ms until `until`, each read back before
/// the next; then stdin closed and the session's end read. False when a
/// line did not come back or the session broke.
async fn echoer(docker: bollard::Docker, until: Instant, tally: Arc<Tally>) -> bool {
    let exec = docker
        .create_exec(
            "talker",
            bollard::models::ExecConfig {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                cmd: Some(vec!["cat".into()]),
                ..Default::default()
            },
        )
        .await;
    let Ok(exec) = exec else { return false };
    let started = docker.start_exec(&exec.id, None).await;
    let Ok(bollard::exec::StartExecResults::Attached {
        mut output,
        mut input,
    }) = started
    else {
        return false;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let line = format!("echo {n}\n");
        if input.write_all(line.as_bytes()).await.is_err() || input.flush().await.is_err() {
            return false;
        }
        let mut got = Vec::new();
        while !got.ends_with(line.as_bytes()) {
            match tokio::time::timeout(Duration::from_secs(30), output.next()).await {
                Ok(Some(Ok(chunk))) => got.extend_from_slice(&chunk.into_bytes()),
                _ => return false,
            }
        }
        n += 1;
    }
    tally.echoes.fetch_add(n, Ordering::Relaxed);
    if input.shutdown().await.is_err() {
        return false;
    }
    // cat ends on stdin's end, and so does its output.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), output.next()).await {
            Ok(None) => return true,
            Ok(Some(Ok(_))) => {}
            _ => return false,
        }
    }
}

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
            let o = common::docker_tls_stdin(
                &job,
                &["import", "--change", "ENV PATH=/bin", "-", "busybox:test"],
                Some(common::busybox_tar()),
            );
            assert!(o.status.success(), "import in {}", job.id);
            common::docker_tls_ok(
                &job,
                &[
                    "run",
                    "-d",
                    "--name",
                    "talker",
                    "busybox:test",
                    "sh",
                    "-c",
                    "while :; do echo tick; sleep 0.1; done",
                ],
            );
            job
        })
        .collect();
    let endpoint = agent.endpoint();
    let rt = common::rt();
    std::thread::sleep(Duration::from_secs(5));
    let idle = footprint(agent.pid());

    let baseline = rt
        .block_on(pinger(
            client(&jobs[0], &endpoint),
            Duration::from_millis(10),
            Instant::now() + Duration::from_secs(20),
        ))
        .expect("idle pings");
    let baseline = &baseline[50.min(baseline.len() / 2)..];

    let tally = Arc::new(Tally::default());
    let cpu_before = (
        crate::cpu_ticks(agent.pid()),
        crate::cpu_ticks(std::process::id()),
        host_ticks(),
    );
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(secs);
    let (pings, samples) = rt.block_on(async {
        let mut watchers = Vec::new();
        for job in &jobs {
            for _ in 0..WATCHERS {
                watchers.push(tokio::spawn(watcher(
                    client(job, &endpoint),
                    until,
                    tally.clone(),
                )));
            }
        }
        // The events streams are open before the execs they watch for.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut others = Vec::new();
        let mut pingers = Vec::new();
        for job in &jobs {
            for _ in 0..FOLLOWERS {
                others.push(tokio::spawn(follower(
                    client(job, &endpoint),
                    until,
                    tally.clone(),
                )));
            }
            for _ in 0..EXECS {
                others.push(tokio::spawn(echoer(
                    client(job, &endpoint),
                    until,
                    tally.clone(),
                )));
            }
            for _ in 0..PINGERS {
                pingers.push(tokio::spawn(pinger(
                    client(job, &endpoint),
                    Duration::from_millis(100),
                    until,
                )));
            }
        }
        // The agent's footprint every 5 s while the clients run.
        let pid = agent.pid();
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                samples.push(footprint(pid));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            samples
        });
        let mut pings = Vec::new();
        for p in pingers {
            match p.await.unwrap() {
                Some(v) => pings.extend(v),
                None => {
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for h in others.into_iter().chain(watchers) {
            if !h.await.unwrap() {
                tally.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        (pings, sampler.await.unwrap())
    });
    let took = t0.elapsed().as_secs_f64();
    let cores = |ticks: u64, before: u64| ticks.saturating_sub(before) as f64 / 100.0 / took;
    let agent_cores = cores(crate::cpu_ticks(agent.pid()), cpu_before.0);
    let client_cores = cores(crate::cpu_ticks(std::process::id()), cpu_before.1);
    let host_cores = cores(host_ticks(), cpu_before.2);
    tally.pings.store(pings.len() as u64, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(10));
    let after = footprint(agent.pid());
    for job in &jobs {
        agent.remove(job);
    }
    agent.stop();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let (p50i, p99i) = (median(baseline), pct(baseline, 0.99));
    let (p50l, p99l) = (median(&pings), pct(&pings, 0.99));
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    crate::row(
        table,
        format!(
            "| front door, {CLIENTS} clients on {JOBS} jobs for {secs} s: `_ping` p50 / p99 (µs), idle → under load | {p50i:.0} / {p99i:.0} → {p50l:.0} / {p99l:.0} | ratios {:.2}× / {:.2}× |",
            p50l / p50i,
            p99l / p99i
        ),
    );
    crate::row(
        table,
        format!(
            "| same: clients dropped; pings, log lines, events, exec echoes | {} of {CLIENTS} | {}, {}, {}, {} |",
            n(&tally.dropped),
            n(&tally.pings),
            n(&tally.lines),
            n(&tally.events),
            n(&tally.echoes)
        ),
    );
    // The agent's memory early in the load (a fifth of the way), at its
    // most, and at the end: bounded is flat from early on.
    let early = samples[samples.len() / 5];
    let last = *samples.last().unwrap();
    let most = samples
        .iter()
        .fold((0, 0), |m, s| (m.0.max(s.0), m.1.max(s.1)));
    crate::row(
        table,
        format!(
            "| same: the agent's RSS (MiB), idle → a fifth of the way → at most → at the end → clients gone | {:.1} → {:.1} → {:.1} → {:.1} → {:.1} | fds {} → {} → {} → {} → {} |",
            mib(idle.0),
            mib(early.0),
            mib(most.0),
            mib(last.0),
            mib(after.0),
            idle.1,
            early.1,
            most.1,
            last.1,
            after.1
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
fn host_ticks() -> u64 {
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
