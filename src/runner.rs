//! `berth run PIPELINE`: an ephemeral runner. It uses an agent (an embedded
//! one on a loopback port, or `--endpoint` with an admin bundle), creates one
//! job, runs the steps with the job's `DOCKER_*` environment, streams their
//! output under step headers with a progress line on a terminal, prints a
//! summary, and tears the job down whatever happens (success, failure,
//! timeout, Ctrl-C or SIGTERM). The exit code is the pipeline's result.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::client::AgentClient;
use crate::frontdoor::{ServeConfig, Server};
use crate::pipeline::{Pipeline, Step};
use crate::sandbox::{Engine, SandboxConfig};

/// Exit codes beyond a failed step's own.
pub const EXIT_TIMEOUT: i32 = 124;
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Serve(#[from] crate::frontdoor::ServeError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("{0}")]
    Io(String),
}

pub enum Agent {
    /// Start an agent inside this process on 127.0.0.1.
    Embedded(Box<SandboxConfig>),
    /// Use a running agent.
    Remote {
        endpoint: String,
        certs_dir: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok,
    Failed(i32),
    TimedOut,
    Interrupted,
    Skipped,
    Broken(String),
}

struct Display {
    tty: bool,
    status: Option<String>,
    /// The last output did not end with a newline: the status line waits.
    mid_line: bool,
}

impl Display {
    fn out(&mut self, bytes: &[u8]) {
        let mut o = std::io::stdout().lock();
        if self.tty && self.status.is_some() && !self.mid_line {
            let _ = o.write_all(b"\r\x1b[2K");
        }
        let _ = o.write_all(bytes);
        self.mid_line = !bytes.ends_with(b"\n");
        if self.tty
            && !self.mid_line
            && let Some(s) = &self.status
        {
            let _ = write!(o, "{s}");
        }
        let _ = o.flush();
    }

    fn line(&mut self, text: &str) {
        let mut s = String::new();
        if self.mid_line {
            s.push('\n');
        }
        s.push_str(text);
        s.push('\n');
        self.out(s.as_bytes());
    }

    fn set_status(&mut self, status: Option<String>) {
        if !self.tty {
            return;
        }
        let mut o = std::io::stdout().lock();
        if !self.mid_line {
            let _ = o.write_all(b"\r\x1b[2K");
            if let Some(s) = &status {
                let _ = write!(o, "{s}");
            }
            let _ = o.flush();
        }
        self.status = status;
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// The workspaces the pipeline's job gets: those its file names; else,
/// with the embedded agent, the pipeline's own directory, unless root owns
/// it (a job never writes as host root). A remote agent's host need not
/// have this machine's paths: it gets only what the file names.
fn workspaces_of(
    pipeline: &Pipeline,
    agent: &Agent,
    display: &mut Display,
) -> Option<Vec<crate::sandbox::WorkspaceRequest>> {
    use std::os::unix::fs::MetadataExt;
    if let Some(w) = &pipeline.workspaces {
        return Some(w.clone());
    }
    if matches!(agent, Agent::Remote { .. }) {
        return None;
    }
    match std::fs::metadata(&pipeline.dir) {
        Ok(md) if md.uid() != 0 && md.gid() != 0 => Some(vec![crate::sandbox::WorkspaceRequest {
            path: pipeline.dir.clone(),
            as_uid: None,
        }]),
        _ => {
            display.line(&format!(
                "berth: {} is root's: not bound into the job (a job never writes as host root)",
                pipeline.dir.display()
            ));
            None
        }
    }
}

fn describe_cache(c: &crate::pipeline::Cache) -> String {
    use crate::jobs::CacheCommit;
    match (&c.key, &c.from) {
        (Some(k), _) => format!(
            "berth: the job starts from project cache {}; it commits {}",
            k.as_str(),
            match c.commit.unwrap_or_default() {
                CacheCommit::OnSuccess => "if every step passes",
                CacheCommit::Always => "at its end, whatever its steps did",
                CacheCommit::Never => "nothing",
            }
        ),
        (None, Some(k)) => format!(
            "berth: the job starts from project cache {}, and never commits to it",
            k.as_str()
        ),
        (None, None) => String::new(),
    }
}

/// Runs the pipeline; returns its exit code.
pub async fn run(pipeline: Pipeline, agent: Agent) -> Result<i32, RunError> {
    let started = Instant::now();
    // Before anything is started: a signal from here on interrupts the run
    // and the job is still torn down.
    let mut signals = crate::signals::Stop::install().map_err(|e| RunError::Io(e.to_string()))?;
    let mut display = Display {
        tty: std::io::stdout().is_terminal(),
        status: None,
        mid_line: false,
    };
    let workspaces = workspaces_of(&pipeline, &agent, &mut display);
    // The embedded agent, if any: serves until we are done, then its
    // shutdown tears down whatever is left.
    let mut own = OwnTime::default();
    let t0 = Instant::now();
    let mut embedded = None;
    let client = match agent {
        Agent::Remote {
            endpoint,
            certs_dir,
        } => AgentClient::new(&endpoint, &certs_dir)?,
        Agent::Embedded(mut cfg) => {
            // A pipeline that names a project cache gets one from this
            // agent (kept in its state dir, as a served agent keeps them).
            if pipeline.cache.is_some() {
                cfg.project_caches.enabled = true;
            }
            // The user who runs the pipeline is this agent's admin: the
            // directories it names (or its own) are allowed.
            for w in workspaces.as_deref().unwrap_or_default() {
                cfg.workspaces.allowed_roots.push(w.path.clone());
            }
            let certs_dir = cfg.state_dir.join("runner-certs");
            let serve = ServeConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                certs_dir: certs_dir.clone(),
                // One job: a warm pool would only cost a second dockerd.
                warm_pool: 0,
                ..ServeConfig::default()
            };
            let tls = crate::frontdoor::Tls::prepare(&serve)?;
            // The server recovers what an earlier run left, in the background.
            let engine = Arc::new(Engine::new(*cfg)?);
            let server = Server::bind(serve, tls, engine).await?;
            let endpoint = server.local_addr().to_string();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(server.run(async {
                let _ = stopped.await;
            }));
            embedded = Some((stop, task));
            AgentClient::new(&endpoint, &certs_dir)?
        }
    };

    let ttl = crate::duration::format(pipeline.ttl.max(std::time::Duration::from_secs(1)));
    let mut spec = serde_json::json!({
        "ttl": ttl,
        "labels": { "pipeline": pipeline.name },
        "workspaces": workspaces.unwrap_or_default(),
    });
    if let (Some(on), Some(to)) = (pipeline.emulation, spec.as_object_mut()) {
        to.insert("emulation".into(), on.into());
    }
    if let Some(cache) = &pipeline.cache
        && let (Some(to), serde_json::Value::Object(fields)) =
            (spec.as_object_mut(), cache.request())
    {
        to.extend(fields.into_iter().filter(|(_, v)| !v.is_null()));
    }
    own.agent_start = t0.elapsed();
    let t0 = Instant::now();
    let created = client.create(&spec).await;
    own.job_start = t0.elapsed();
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            stop_embedded(embedded).await;
            return Err(e.into());
        }
    };
    let bundle_dir = std::env::temp_dir().join(format!("berth-run-{}", created.id));
    let write = crate::pki::Bundle {
        ca_pem: created.ca.clone(),
        cert_pem: created.cert.clone(),
        key_pem: created.key.clone(),
    }
    .write_to(&bundle_dir);
    let n = pipeline.steps.len();
    display.line(&format!(
        "berth: pipeline {} on job {} ({n} step{})",
        pipeline.name,
        created.id,
        if n == 1 { "" } else { "s" }
    ));
    if let Some(c) = &pipeline.cache {
        display.line(&describe_cache(c));
    }
    let mut results: Vec<(String, Outcome, Option<Duration>)> = Vec::new();
    if let Err(e) = write {
        results.push((
            "(job certificate)".into(),
            Outcome::Broken(e.to_string()),
            None,
        ));
    }
    let base_env = vec![
        ("DOCKER_HOST".to_string(), created.endpoint.clone()),
        ("DOCKER_TLS_VERIFY".to_string(), "1".to_string()),
        (
            "DOCKER_CERT_PATH".to_string(),
            bundle_dir.display().to_string(),
        ),
        ("BERTH_JOB_ID".to_string(), created.id.clone()),
        ("BERTH_JOB_ADDR".to_string(), created.address.clone()),
        (
            "BERTH_JOB_PORTS".to_string(),
            created.ports.map(|p| p.to_string()).unwrap_or_default(),
        ),
    ];
    let total = pipeline.steps.len();
    let mut stop = !results.is_empty();
    for (i, step) in pipeline.steps.iter().enumerate() {
        if stop {
            results.push((step.name.clone(), Outcome::Skipped, None));
            continue;
        }
        display.line(&format!("── [{}/{}] {} ──", i + 1, total, step.name));
        let t0 = Instant::now();
        let outcome = run_step(
            step,
            &pipeline.dir,
            &base_env,
            &mut display,
            &mut signals,
            i + 1,
            total,
        )
        .await;
        let took = t0.elapsed();
        display.set_status(None);
        let verdict = match &outcome {
            Outcome::Ok => format!("✓ {} ({})", step.name, secs(took)),
            Outcome::Failed(c) => {
                format!("✗ {} failed with exit code {c} ({})", step.name, secs(took))
            }
            Outcome::TimedOut => format!("✗ {} timed out after {}", step.name, secs(step.timeout)),
            Outcome::Interrupted => format!("✗ {} interrupted ({})", step.name, secs(took)),
            Outcome::Broken(e) => format!("✗ {} could not run: {e}", step.name),
            Outcome::Skipped => String::new(),
        };
        display.line(&verdict);
        stop = outcome != Outcome::Ok;
        results.push((step.name.clone(), outcome, Some(took)));
    }

    // Teardown, whatever happened.
    let t0 = Instant::now();
    // A keyed job commits on success (every step passed) when it asked to.
    let passed = results.iter().all(|(_, o, _)| *o == Outcome::Ok);
    let teardown = client
        .delete_with(
            &created.id,
            Some(if passed { "success" } else { "failure" }),
        )
        .await;
    own.teardown = t0.elapsed();
    // Close our pooled connection so the embedded agent drains at once.
    drop(client);
    let t1 = Instant::now();
    stop_embedded(embedded).await;
    own.agent_stop = t1.elapsed();
    let _ = std::fs::remove_dir_all(&bundle_dir);
    match &teardown {
        Ok(()) => display.line(&format!(
            "berth: job {} torn down ({})",
            created.id,
            secs(t0.elapsed())
        )),
        Err(e) => display.line(&format!(
            "berth: teardown of job {} failed: {e}",
            created.id
        )),
    }

    let code = results
        .iter()
        .find_map(|(_, o, _)| match o {
            Outcome::Ok | Outcome::Skipped => None,
            Outcome::Failed(c) => Some(*c),
            Outcome::TimedOut => Some(EXIT_TIMEOUT),
            Outcome::Interrupted => Some(EXIT_INTERRUPTED),
            Outcome::Broken(_) => Some(1),
        })
        .unwrap_or(if teardown.is_ok() { 0 } else { 1 });
    let width = results
        .iter()
        .map(|(n, _, _)| n.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut summary = format!(
        "\npipeline {}: {} in {}\n  {:>2}  {:<width$}  {:<12}  {}\n",
        pipeline.name,
        if code == 0 { "passed" } else { "FAILED" },
        secs(started.elapsed()),
        "#",
        "step",
        "result",
        "time"
    );
    for (i, (name, o, took)) in results.iter().enumerate() {
        let r = match o {
            Outcome::Ok => "ok".to_string(),
            Outcome::Failed(c) => format!("failed ({c})"),
            Outcome::TimedOut => "timed out".into(),
            Outcome::Interrupted => "interrupted".into(),
            Outcome::Skipped => "skipped".into(),
            Outcome::Broken(_) => "error".into(),
        };
        let t = took.map(secs).unwrap_or_else(|| "-".into());
        summary.push_str(&format!("  {:>2}  {name:<width$}  {r:<12}  {t}\n", i + 1));
    }
    let wall = started.elapsed();
    let in_steps: Duration = results.iter().filter_map(|(_, _, t)| *t).sum();
    summary.push_str(&own.line(wall, in_steps));
    display.out(summary.as_bytes());
    Ok(code)
}

/// Where berth's own time in a run goes: everything but the steps.
#[derive(Debug, Default)]
struct OwnTime {
    /// The embedded agent up (its CA and certificates, its engine), or the
    /// remote agent's client made.
    agent_start: Duration,
    /// The job requested until it answers, its certificate returned.
    job_start: Duration,
    /// The job's teardown, as its delete request took.
    teardown: Duration,
    /// The embedded agent stopped.
    agent_stop: Duration,
}

impl OwnTime {
    /// The summary's line: the total, then each part, and what is left
    /// (reading the pipeline, the job's bundle, the display).
    fn line(&self, wall: Duration, in_steps: Duration) -> String {
        let own = wall.saturating_sub(in_steps);
        let parts = self.agent_start + self.job_start + self.teardown + self.agent_stop;
        format!(
            "  berth's own time: {:.2}s of {:.2}s (agent start {:.2}s, job start {:.2}s, \
             teardown {:.2}s, agent stop {:.2}s, other {:.2}s; the rest is the steps)\n",
            own.as_secs_f64(),
            wall.as_secs_f64(),
            self.agent_start.as_secs_f64(),
            self.job_start.as_secs_f64(),
            self.teardown.as_secs_f64(),
            self.agent_stop.as_secs_f64(),
            own.saturating_sub(parts).as_secs_f64(),
        )
    }
}

async fn stop_embedded(
    embedded: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
) {
    if let Some((stop, task)) = embedded {
        let _ = stop.send(());
        let _ = task.await;
    }
}

async fn run_step(
    step: &Step,
    dir: &std::path::Path,
    base_env: &[(String, String)],
    display: &mut Display,
    stop: &mut crate::signals::Stop,
    n: usize,
    total: usize,
) -> Outcome {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&step.run)
        .current_dir(dir)
        .envs(step.env.iter())
        .envs(base_env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group: timeout and Ctrl-C end the whole step.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Broken(format!("cannot start sh: {e}")),
    };
    let pgid = child.id().map(|p| p as i32);
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let (mut ob, mut eb) = (vec![0u8; 16384], vec![0u8; 16384]);
    let deadline = tokio::time::Instant::now() + step.timeout;
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(120));
    let mut frame = 0usize;
    let outcome = loop {
        tokio::select! {
            r = async { out.as_mut().unwrap().read(&mut ob).await }, if out.is_some() => match r {
                Ok(0) | Err(_) => out = None,
                Ok(k) => display.out(&ob[..k]),
            },
            r = async { err.as_mut().unwrap().read(&mut eb).await }, if err.is_some() => match r {
                Ok(0) | Err(_) => err = None,
                Ok(k) => display.out(&eb[..k]),
            },
            s = child.wait(), if out.is_none() && err.is_none() => break match s {
                Ok(s) if s.success() => Outcome::Ok,
                Ok(s) => Outcome::Failed(s.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
                })),
                Err(e) => Outcome::Broken(e.to_string()),
            },
            _ = tokio::time::sleep_until(deadline) => break Outcome::TimedOut,
            _ = stop.recv() => break Outcome::Interrupted,
            _ = tick.tick() => {
                frame = frame.wrapping_add(1);
                display.set_status(Some(format!(
                    "{} [{n}/{total}] {} — {}",
                    SPINNER[frame % SPINNER.len()],
                    step.name,
                    secs(t0.elapsed())
                )));
            }
        }
    };
    if matches!(outcome, Outcome::TimedOut | Outcome::Interrupted)
        && let Some(pg) = pgid
    {
        let pg = nix::unistd::Pid::from_raw(pg);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_time_names_each_part_and_the_rest() {
        let ms = Duration::from_millis;
        let own = OwnTime {
            agent_start: ms(40),
            job_start: ms(350),
            teardown: ms(100),
            agent_stop: ms(10),
        };
        assert_eq!(
            own.line(ms(9_600), ms(9_000)),
            "  berth's own time: 0.60s of 9.60s (agent start 0.04s, job start 0.35s, \
             teardown 0.10s, agent stop 0.01s, other 0.10s; the rest is the steps)\n"
        );
    }
}
