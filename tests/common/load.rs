//! Many clients held open on a front door's jobs at once, each a bollard
//! client with its own connections as CI tools hold them: `_ping` every
//! 100 ms, `logs -f` of a container that prints every 100 ms, `events`,
//! and `exec` sessions of `cat` with stdin, a line written every 200 ms
//! and read back. tests/frontdoor.rs runs a few for seconds and asserts
//! that none broke; the bench suite's load section runs 200 for minutes
//! and times the pings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::TlsJob;

/// How many clients of each kind every job gets.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub pingers: usize,
    pub followers: usize,
    pub watchers: usize,
    pub execs: usize,
}

impl Mix {
    pub fn per_job(&self) -> usize {
        self.pingers + self.followers + self.watchers + self.execs
    }
}

/// What the clients did, and how many broke: a ping that failed, a stream
/// that failed or ended before the time was up, an echo that did not come
/// back, an events stream that did not see its job's execs end after it.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every ping's latency, µs.
    pub pings: Vec<f64>,
    pub lines: u64,
    pub events: u64,
    pub echoes: u64,
    pub dropped: u64,
}

impl Outcome {
    /// The counts, for a message.
    pub fn summary(&self) -> String {
        format!(
            "{} dropped; {} pings, {} log lines, {} events, {} echoes",
            self.dropped,
            self.pings.len(),
            self.lines,
            self.events,
            self.echoes
        )
    }
}

#[derive(Default)]
struct Tally {
    lines: AtomicU64,
    events: AtomicU64,
    echoes: AtomicU64,
}

/// Makes a job ready for the clients: busybox imported and `talker`
/// running, a line every 100 ms.
pub fn prepare(job: &TlsJob) {
    super::import_busybox_tls(job);
    super::docker_tls_ok(
        job,
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
}

/// A bollard client of `job` through the front door at `endpoint`.
pub fn client(job: &TlsJob, endpoint: &str) -> bollard::Docker {
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

/// `mix` on every one of `jobs` (made ready by [`prepare`]) until `until`:
/// the events streams first, so that they see the execs start.
pub async fn run(jobs: &[TlsJob], endpoint: &str, mix: Mix, until: Instant) -> Outcome {
    let tally = Arc::new(Tally::default());
    let mut watchers = Vec::new();
    for job in jobs {
        for _ in 0..mix.watchers {
            watchers.push(tokio::spawn(watcher(
                client(job, endpoint),
                until,
                mix.execs,
                tally.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut others = Vec::new();
    let mut pingers = Vec::new();
    for job in jobs {
        for _ in 0..mix.followers {
            others.push(tokio::spawn(follower(
                client(job, endpoint),
                until,
                tally.clone(),
            )));
        }
        for _ in 0..mix.execs {
            others.push(tokio::spawn(echoer(
                client(job, endpoint),
                until,
                tally.clone(),
            )));
        }
        for _ in 0..mix.pingers {
            pingers.push(tokio::spawn(pinger(
                client(job, endpoint),
                Duration::from_millis(100),
                until,
            )));
        }
    }
    let mut out = Outcome::default();
    for p in pingers {
        match p.await.unwrap() {
            Some(v) => out.pings.extend(v),
            None => out.dropped += 1,
        }
    }
    for h in others.into_iter().chain(watchers) {
        if !h.await.unwrap() {
            out.dropped += 1;
        }
    }
    out.lines = tally.lines.load(Ordering::Relaxed);
    out.events = tally.events.load(Ordering::Relaxed);
    out.echoes = tally.echoes.load(Ordering::Relaxed);
    out
}

/// Pings every `every` until `until`; the latencies in µs, or None when a
/// ping failed.
pub async fn pinger(docker: bollard::Docker, every: Duration, until: Instant) -> Option<Vec<f64>> {
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
async fn watcher(docker: bollard::Docker, until: Instant, execs: usize, tally: Arc<Tally>) -> bool {
    let mut events = docker.events(None::<bollard::query_parameters::EventsOptions>);
    let (mut seen, mut died) = (0, 0);
    let give_up = until + Duration::from_secs(120);
    while died < execs {
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
