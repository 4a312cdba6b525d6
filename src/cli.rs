//! Command line: `berth serve`, `berth job`, `berth certs`, `berth sandbox`;
//! the parsing and the exit codes, nothing of the engine's logic.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::sandbox::{Engine, Limits, SandboxConfig, SandboxError, Status};

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "Docker-in-Docker CI build agent: one real dockerd per job, in its own user namespaces"
)]
pub struct Cli {
    /// How log lines are written to stderr: `text` for people, `json` (one
    /// object per line, with the job and client of its span) for log
    /// collectors. BERTH_LOG filters them (`info`, `berth::frontdoor::proxy=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BERTH_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A job's project cache (`job create`).
#[derive(clap::Args, Debug, Default)]
pub struct CacheArgs {
    /// Start from this project cache (empty the first time), and commit to
    /// it at the end (see --cache-commit).
    #[arg(long, value_name = "KEY", conflicts_with = "cache_from")]
    cache_key: Option<String>,
    /// When the job's disk becomes its key's cache: on-success (when `job
    /// rm --outcome success` ends it), always, never. With --token, the
    /// agent's rule names the key and whether the job may commit.
    #[arg(long, value_name = "WHEN", value_parser = ["on-success", "always", "never"])]
    cache_commit: Option<String>,
    /// Start from this project cache and never commit (a pull request's
    /// job).
    #[arg(long, value_name = "KEY")]
    cache_from: Option<String>,
}

impl CacheArgs {
    /// The flags as a pipeline's `[cache]`, if they name a key; `commit`
    /// alone changes only when the pipeline's own key commits.
    fn pipeline_cache(
        &self,
        file: Option<&crate::pipeline::Cache>,
    ) -> Result<Option<crate::pipeline::Cache>, CliError> {
        use crate::sandbox::fs::caches::Key;
        let key = |k: &Option<String>, flag: &str| {
            k.clone()
                .map(Key::new)
                .transpose()
                .map_err(|e| CliError::Usage(format!("{flag}: {e}")))
        };
        let commit = match self.cache_commit.as_deref() {
            None => None,
            Some(w) => {
                Some(serde_json::from_value(w.into()).map_err(|e| CliError::Usage(e.to_string()))?)
            }
        };
        let mut c = crate::pipeline::Cache {
            key: key(&self.cache_key, "--cache-key")?,
            commit,
            from: key(&self.cache_from, "--cache-from")?,
        };
        if c.key.is_none() && c.from.is_none() {
            match (c.commit, file) {
                (None, _) => return Ok(None),
                (Some(_), Some(f)) if f.key.is_some() => c.key = f.key.clone(),
                (Some(_), _) => {
                    return Err(CliError::Usage(
                        "--cache-commit needs --cache-key or a [cache] key in the pipeline".into(),
                    ));
                }
            }
        }
        c.check()
            .map_err(|e| CliError::Usage(format!("--cache-*: {e}")))?;
        Ok(Some(c))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the mutual-TLS front door (Docker API of every job, and the job API).
    Serve {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Run a pipeline file in a fresh job and tear the job down afterwards.
    Run {
        /// The pipeline (TOML; see pipelines/hello.toml).
        pipeline: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// Use a running agent (HOST:PORT) instead of an embedded one.
        #[arg(long)]
        endpoint: Option<String>,
        /// With --endpoint: directory holding admin/{ca,cert,key}.pem.
        #[arg(long, default_value = "certs")]
        certs_dir: PathBuf,
        /// Bind no workspace into the job: neither the pipeline's
        /// `workspaces` nor (with the embedded agent) its own directory.
        #[arg(long)]
        no_workspace: bool,
        /// The project cache, in place of the pipeline's `[cache]`.
        #[command(flatten)]
        cache: Box<CacheArgs>,
        /// Start with no project cache, whatever the pipeline's `[cache]`.
        #[arg(long, conflicts_with_all = ["cache_key", "cache_from"])]
        no_cache: bool,
    },
    /// Check every prerequisite and print a pass/fail table with fixes.
    Doctor {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Create, list and remove jobs on an agent.
    #[command(subcommand)]
    Job(JobCmd),
    /// List and remove an agent's project caches (warm starts per key).
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Whether an agent takes another job: exit 0 when it does (with at
    /// least --min-free jobs' room), 1 when it does not, 2 when it cannot be
    /// asked. A readiness probe or a CI scheduler's check.
    Capacity {
        #[command(flatten)]
        agent: AgentArgs,
        /// Jobs it must be able to start now.
        #[arg(long, default_value_t = 1)]
        min_free: usize,
        /// Memory the host must have available, in bytes.
        #[arg(long)]
        min_memory_bytes: Option<u64>,
        /// Print the agent's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Certificate material.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Run and manage job sandboxes directly (no TLS front door).
    #[command(subcommand)]
    Sandbox(SandboxCmd),
}

/// The front door's flags; they win over the configuration file.
#[derive(clap::Args, Debug, Clone)]
pub struct FrontArgs {
    /// Address the agent listens on (default 0.0.0.0:2376).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Certificates directory (CA, server, admin bundle).
    #[arg(long)]
    pub certs_dir: Option<PathBuf>,
    /// Further names or addresses for the server certificate, added to the
    /// configuration's `san` (repeatable; BERTH_SAN takes a comma-separated
    /// list, e.g. a node's address from Kubernetes' downward API).
    #[arg(long, env = "BERTH_SAN", value_delimiter = ',')]
    pub san: Vec<String>,
}

impl FrontArgs {
    fn apply(self, mut serve: crate::frontdoor::ServeConfig) -> crate::frontdoor::ServeConfig {
        if let Some(l) = self.listen {
            serve.listen = l;
        }
        if let Some(d) = self.certs_dir {
            serve.certs_dir = d;
        }
        for s in self.san {
            let s = s.trim().to_string();
            if !s.is_empty() && !serve.san.contains(&s) {
                serve.san.push(s);
            }
        }
        serve
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The agent's front door, HOST:PORT.
    #[arg(long, env = "BERTH_ENDPOINT", default_value = "localhost:2376")]
    pub endpoint: String,
    /// Certificates directory holding admin/{ca,cert,key}.pem.
    #[arg(long, env = "BERTH_CERTS_DIR", default_value = "certs")]
    pub certs_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// Every key with a state, least recently used first.
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Remove a key and its state (running jobs keep their copies).
    Rm {
        #[command(flatten)]
        agent: AgentArgs,
        key: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Create a job and write its client certificate.
    Create {
        #[command(flatten)]
        agent: AgentArgs,
        /// Lifetime: 90s, 30m, 2h (the agent's default otherwise).
        #[arg(long)]
        ttl: Option<String>,
        /// Ask with a CI platform's OIDC token (a file; `-`: stdin) at the
        /// agent's token listener instead of with the admin bundle.
        #[arg(long, conflicts_with_all = ["labels", "memory_bytes", "disk_bytes"])]
        token: Option<PathBuf>,
        /// With --token: the token listener, HOST:PORT (the endpoint's host, port 2377).
        #[arg(long, requires = "token")]
        token_endpoint: Option<String>,
        /// With --token: the agent's CA certificate (default <certs-dir>/ca.pem).
        #[arg(long, requires = "token")]
        ca: Option<PathBuf>,
        /// Directory for ca.pem, cert.pem, key.pem (default ./berth-job-<id>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print id, endpoint and paths as JSON.
        #[arg(long)]
        json: bool,
        /// Labels, KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Memory limit of the whole job in bytes (the agent's default otherwise).
        #[arg(long)]
        memory_bytes: Option<u64>,
        /// Size of the job's own disk in bytes; 0 for none (the agent's default otherwise).
        #[arg(long)]
        disk_bytes: Option<u64>,
        /// A host directory bound into the job at the same path, with
        /// DIR@tmp beside it (repeatable). DIR: written as its owner's uid;
        /// DIR:root: root in the job writes as its owner; DIR:UID: that uid.
        #[arg(long = "workspace", value_name = "DIR[:root|:UID]")]
        workspaces: Vec<crate::sandbox::WorkspaceRequest>,
        #[command(flatten)]
        cache: Box<CacheArgs>,
        /// Run no foreign binaries (arm64 images) through the host's
        /// emulators: the engine's builder then no longer starts each of
        /// them on every build to list its platforms.
        #[arg(long)]
        no_emulation: bool,
    },
    /// List the agent's jobs.
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// End a job: its daemon and everything in it go, its certificate stops working.
    Rm {
        #[command(flatten)]
        agent: AgentArgs,
        id: String,
        /// How the job ended: a job with a cache key commits on success
        /// (--cache-commit on-success).
        #[arg(long, value_parser = ["success", "failure"])]
        outcome: Option<String>,
    },
    /// From inside a job: end it with its own certificate (a job made for a
    /// CI platform's token has no admin to end it), saying how it ended.
    End {
        /// The job's endpoint (tcp://HOST:PORT or HOST:PORT).
        #[arg(long, env = "DOCKER_HOST")]
        endpoint: String,
        /// The job's bundle: ca.pem, cert.pem, key.pem.
        #[arg(long, env = "DOCKER_CERT_PATH")]
        cert_path: PathBuf,
        /// How the job ended: a job with a cache key commits on success
        /// (when its key and rule let it).
        #[arg(long, value_parser = ["success", "failure"])]
        outcome: Option<String>,
    },
    /// What a job did with its daemon: one line per request (kept after the job ends).
    Audit {
        #[command(flatten)]
        agent: AgentArgs,
        id: String,
        /// The records as the agent keeps them, JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Write docker:dind's DOCKER_TLS_CERTDIR layout (ca/, server/, client/)
    /// into DIR; an existing ca/{cert,key}.pem there is used as the CA.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra server names or addresses (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Configuration file (TOML, with a [sandbox] table).
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory (overrides the configuration).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Start one job, print its DOCKER_HOST and keep it until Ctrl-C/SIGTERM.
    Up {
        #[command(flatten)]
        engine: EngineArgs,
        /// Whole-job memory limit in MiB.
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Whole-job process limit.
        #[arg(long)]
        pids: Option<u64>,
        /// Whole-job CPU limit in cores.
        #[arg(long)]
        cpus: Option<f64>,
    },
    /// Tear down every job recorded in the state dir (left by a crashed agent).
    Recover {
        #[command(flatten)]
        engine: EngineArgs,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read configuration {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration {path}: {source}")]
    ConfigParse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Serve(#[from] crate::frontdoor::ServeError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Run(#[from] crate::runner::RunError),
    /// A pipeline's own result; nothing more to print.
    #[error("")]
    Exit(i32),
    #[error("{0}")]
    Job(String),
}

impl CliError {
    /// Exit code: 64 (EX_USAGE) for configuration errors, 69 (EX_UNAVAILABLE)
    /// for missing prerequisites, 1 otherwise; the same for `berth run`'s
    /// embedded agent as for `berth serve`.
    pub fn exit_code(&self) -> i32 {
        use crate::frontdoor::ServeError;
        use crate::runner::RunError;
        match self {
            CliError::ConfigRead { .. }
            | CliError::ConfigParse { .. }
            | CliError::Usage(_)
            | CliError::Serve(ServeError::Config { .. })
            | CliError::Sandbox(SandboxError::Config(_))
            | CliError::Run(RunError::Serve(ServeError::Config { .. }))
            | CliError::Run(RunError::Sandbox(SandboxError::Config(_))) => 64,
            CliError::Sandbox(SandboxError::Prerequisite(_))
            | CliError::Run(RunError::Sandbox(SandboxError::Prerequisite(_))) => 69,
            CliError::Pipeline(_) => 64,
            CliError::Exit(c) => *c,
            _ => 1,
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    sandbox: SandboxConfig,
    #[serde(default)]
    serve: crate::frontdoor::ServeConfig,
    #[serde(default)]
    registries: crate::images::registries::Registries,
    #[serde(default)]
    cache: crate::images::cache::CacheConfig,
    #[serde(default)]
    workspaces: crate::sandbox::fs::workspaces::WorkspacesConfig,
    #[serde(default)]
    project_caches: crate::sandbox::fs::caches::ProjectCachesConfig,
    #[serde(default)]
    policy: crate::frontdoor::policy::Policy,
    #[serde(default)]
    token: crate::oidc::TokenConfig,
}

pub fn load_config(args: &EngineArgs) -> Result<SandboxConfig, CliError> {
    Ok(load_file(args)?.sandbox)
}

fn load_file(args: &EngineArgs) -> Result<FileConfig, CliError> {
    let cfg = load_file_unvalidated(args)?;
    cfg.sandbox.validate().map_err(SandboxError::from)?;
    Ok(cfg)
}

fn load_file_unvalidated(args: &EngineArgs) -> Result<FileConfig, CliError> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::ConfigRead {
                path: path.clone(),
                source,
            })?;
            let cfg =
                toml::from_str::<FileConfig>(&text).map_err(|source| CliError::ConfigParse {
                    path: path.clone(),
                    source,
                })?;
            // It parsed as a whole, so it parses as a table.
            if let Ok(doc) = toml::from_str::<toml::Table>(&text) {
                for old in crate::duration::deprecated_keys(&doc) {
                    tracing::warn!(config = %path.display(), "{old}");
                }
            }
            cfg
        }
        None => FileConfig::default(),
    };
    if let Some(d) = &args.state_dir {
        cfg.sandbox.state_dir = d.clone();
    }
    cfg.sandbox.registries = cfg.registries.clone();
    cfg.sandbox.cache = cfg.cache.clone();
    cfg.sandbox.workspaces = cfg.workspaces.clone();
    cfg.sandbox.project_caches = cfg.project_caches.clone();
    cfg.serve.policy = cfg.policy.clone();
    cfg.serve.token = cfg.token.clone();
    Ok(cfg)
}

/// The configuration file's text as `serve` reads it: parsed, then
/// checked key by key (a fuzz target's entry).
#[cfg(fuzzing)]
pub fn check_config_text(text: &str) -> Result<(), String> {
    let cfg = toml::from_str::<FileConfig>(text).map_err(|e| e.to_string())?;
    let mut sandbox = cfg.sandbox;
    sandbox.project_caches = cfg.project_caches;
    sandbox.validate().map_err(|e| e.to_string())?;
    let mut serve = cfg.serve;
    serve.policy = cfg.policy;
    serve.token = cfg.token;
    serve.validate().map_err(|e| e.to_string())
}

impl Command {
    /// Whether this command runs sandboxes in this process (and so needs
    /// delegated cgroups).
    fn runs_an_engine(&self) -> bool {
        match self {
            Command::Serve { .. } | Command::Doctor { .. } | Command::Sandbox(_) => true,
            Command::Run { endpoint, .. } => endpoint.is_none(),
            Command::Job(_) | Command::Cache(_) | Command::Certs(_) | Command::Capacity { .. } => {
                false
            }
        }
    }
}

/// On a systemd host with cgroup v2, a command that runs sandboxes from a
/// cgroup systemd did not delegate (a login shell, a CI runner's service)
/// starts itself again in a transient scope with `Delegate=yes`, as systemd
/// asks of anyone who manages cgroups. Returns only when that is not needed
/// or not possible; the engine then says why jobs get no cgroups.
pub fn enter_delegated_scope(cli: &Cli) {
    use crate::sandbox::cgroup::v2;
    use std::os::unix::process::CommandExt;
    if !cli.command.runs_an_engine()
        || !nix::unistd::geteuid().is_root()
        || !v2::needs_delegated_scope(Path::new("/proc"), Path::new("/sys/fs/cgroup"))
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new("systemd-run")
        .args([
            "--scope",
            "--quiet",
            "--collect",
            "--property=Delegate=yes",
            "--description=berth (delegated cgroups for its jobs)",
            "--",
        ])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(v2::SCOPE_MARK, "1")
        .exec();
    eprintln!("warning: cannot start a delegated systemd scope (systemd-run): {err}");
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { engine, front } => {
            let file = load_file(&engine)?;
            let serve = front.apply(file.serve);
            // Configuration and PKI first: the host is not touched until
            // both are known good.
            let tls = crate::frontdoor::Tls::prepare(&serve)?;
            let stop = crate::signals::Stop::install().map_err(|e| CliError::Job(e.to_string()))?;
            let inherited = crate::frontdoor::inherited_listener().map_err(CliError::Usage)?;
            let engine = std::sync::Arc::new(Engine::new(file.sandbox)?);
            let server = match inherited {
                Some(l) => crate::frontdoor::Server::from_listener(serve, tls, engine, l).await?,
                None => crate::frontdoor::Server::bind(serve, tls, engine).await?,
            };
            // systemd's Type=notify: ready once the listener is bound (and
            // a no-op without NOTIFY_SOCKET).
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
                tracing::warn!(error = %e, "cannot tell systemd the agent is ready");
            }
            server
                .run(async {
                    shutdown_signal(stop).await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                })
                .await;
            Ok(())
        }
        Command::Certs(CertsCmd::Init { dir, san }) => {
            crate::pki::init_dind_layout(&dir, &san)?;
            println!(
                "wrote {}/{{ca,server,client}} (docker:dind layout; client/ is the admin identity)",
                dir.display()
            );
            Ok(())
        }
        Command::Job(cmd) => job(cmd).await,
        Command::Cache(cmd) => cache(cmd).await,
        Command::Capacity {
            agent,
            min_free,
            min_memory_bytes,
            json,
        } => {
            let asked = async {
                crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?
                    .capacity()
                    .await
            };
            let c = match asked.await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Err(CliError::Exit(2));
                }
            };
            let short = capacity_short(&c, min_free, min_memory_bytes);
            if json {
                println!("{}", serde_json::to_string(&c).unwrap_or_default());
            } else {
                println!(
                    "{}: {} free ({} id ranges, {} warm), {} jobs, {} MiB available",
                    short.as_deref().unwrap_or("accepting"),
                    c.free,
                    c.free_ranges,
                    c.warm_ready,
                    c.jobs,
                    c.memory_available_bytes >> 20
                );
                for b in &c.bounds {
                    println!("  at most {} jobs by {}: {}", b.jobs, b.name, b.detail);
                }
                for l in &c.limits {
                    println!("  {}: {}", l.name, l.detail);
                }
            }
            match short {
                None => Ok(()),
                Some(_) => Err(CliError::Exit(1)),
            }
        }
        Command::Run {
            pipeline,
            engine,
            endpoint,
            certs_dir,
            no_workspace,
            cache,
            no_cache,
        } => {
            let mut p = crate::pipeline::Pipeline::load(&pipeline)?;
            if no_workspace {
                p.workspaces = Some(Vec::new());
            }
            if no_cache {
                p.cache = None;
            } else if let Some(c) = cache.pipeline_cache(p.cache.as_ref())? {
                p.cache = Some(c);
            }
            let agent = match endpoint {
                Some(endpoint) => crate::runner::Agent::Remote {
                    endpoint,
                    certs_dir,
                },
                None => crate::runner::Agent::Embedded(Box::new(load_config(&engine)?)),
            };
            let code = crate::runner::run(p, agent).await?;
            if code != 0 {
                return Err(CliError::Exit(code));
            }
            Ok(())
        }
        Command::Doctor { engine, front } => {
            let file = load_file_unvalidated(&engine)?;
            let serve = front.apply(file.serve);
            let mut checks = crate::doctor::run(&file.sandbox, &serve);
            checks.extend(crate::doctor::check_running_agent(&serve).await);
            print!("{}", crate::doctor::render(&checks));
            let failed = checks
                .iter()
                .filter(|c| c.verdict == crate::doctor::Verdict::Fail)
                .count();
            if failed > 0 {
                return Err(CliError::Job(format!("{failed} check(s) failed")));
            }
            Ok(())
        }
        Command::Sandbox(SandboxCmd::Up {
            engine,
            memory_mib,
            pids,
            cpus,
        }) => {
            let cfg = load_config(&engine)?;
            let mut limits = cfg.default_limits.clone();
            if let Some(m) = memory_mib {
                limits.memory_bytes = Some(m << 20);
            }
            limits.pids = pids.or(limits.pids);
            limits.cpus = cpus.or(limits.cpus);
            let engine = Engine::new(cfg)?;
            for r in engine.recover().await {
                if let Err(e) = r {
                    tracing::error!(error = %e, "recovery");
                }
            }
            up(&engine, limits).await
        }
        Command::Sandbox(SandboxCmd::Recover { engine }) => {
            let engine = Engine::new(load_config(&engine)?)?;
            let mut failed = 0;
            for r in engine.recover().await {
                match r {
                    Ok(id) => println!("torn down {id}"),
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: {e}");
                    }
                }
            }
            if failed > 0 {
                return Err(CliError::Job(format!(
                    "{failed} job(s) could not be torn down"
                )));
            }
            Ok(())
        }
    }
}

async fn up(engine: &Engine, limits: Limits) -> Result<(), CliError> {
    let mut stop = crate::signals::Stop::install().map_err(|e| CliError::Job(e.to_string()))?;
    let sb = engine.start(Some(limits)).await?;
    println!("job {} ready in {:.0?}", sb.id(), sb.age());
    println!("export DOCKER_HOST=unix://{}", sb.socket().display());
    let outcome = tokio::select! {
        _ = stop.recv() => None,
        s = sb.ended() => Some(s),
    };
    let t = engine.teardown(sb.id()).await?;
    match t.usage {
        Some(u) => println!(
            "job {} torn down in {:.0?}; it used {:.2} s of CPU{}",
            t.id,
            t.took,
            u.cpu.as_secs_f64(),
            u.memory_peak
                .map(|b| format!(" and {:.0} MiB of memory at most", b as f64 / 1048576.0))
                .unwrap_or_default()
        ),
        None => println!("job {} torn down in {:.0?}", t.id, t.took),
    }
    match outcome {
        Some(Status::Failed(why)) => Err(CliError::Job(format!("job {} failed: {why}", sb.id()))),
        _ => Ok(()),
    }
}

async fn shutdown_signal(mut stop: crate::signals::Stop) {
    let sig = stop.recv().await;
    tracing::info!(signal = sig, "shutting down");
}

async fn cache(cmd: CacheCmd) -> Result<(), CliError> {
    match cmd {
        CacheCmd::Ls { agent, json } => {
            let client = crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?;
            let keys = client.caches().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&keys)
                        .map_err(|e| CliError::Usage(e.to_string()))?
                );
                return Ok(());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let ago = |t: u64| {
                // Whole minutes: seconds would only be noise here.
                let d = std::time::Duration::from_secs(now.saturating_sub(t) / 60 * 60);
                if d.is_zero() {
                    "just now".to_string()
                } else {
                    format!("{} ago", crate::duration::format(d))
                }
            };
            println!(
                "{:<40} {:>10} {:>16} {:>16}  COMMITTED BY",
                "KEY", "SIZE", "LAST USED", "COMMITTED"
            );
            for k in keys {
                println!(
                    "{:<40} {:>10} {:>16} {:>16}  {}",
                    k.key,
                    size_text(k.bytes),
                    ago(k.last_used),
                    ago(k.committed_at),
                    k.committed_by
                );
            }
            Ok(())
        }
        CacheCmd::Rm { agent, key } => {
            let client = crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?;
            client.remove_cache(&key).await?;
            println!("removed {key}");
            Ok(())
        }
    }
}

/// Bytes as people read them: MiB below a GiB, GiB with one decimal above.
fn size_text(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    } else {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    }
}

async fn job(cmd: JobCmd) -> Result<(), CliError> {
    match cmd {
        JobCmd::Create {
            agent,
            ttl,
            out,
            json,
            labels,
            memory_bytes,
            disk_bytes,
            token,
            token_endpoint,
            ca,
            workspaces,
            cache,
            no_emulation,
        } => {
            let mut spec = serde_json::Map::new();
            if no_emulation {
                spec.insert("emulation".into(), false.into());
            }
            let cache = *cache;
            for (field, value) in [
                ("cache_key", cache.cache_key),
                ("cache_commit", cache.cache_commit),
                ("cache_from", cache.cache_from),
            ] {
                if let Some(v) = value {
                    spec.insert(field.into(), v.into());
                }
            }
            if let Some(t) = ttl {
                let d = crate::duration::parse(&t, "--ttl").map_err(CliError::Usage)?;
                spec.insert("ttl".into(), crate::duration::format(d).into());
            }
            if !workspaces.is_empty() {
                let w = serde_json::to_value(&workspaces)
                    .map_err(|e| CliError::Usage(e.to_string()))?;
                spec.insert("workspaces".into(), w);
            }
            let created = match token {
                Some(file) => {
                    if spec.contains_key("cache_key") || spec.contains_key("cache_from") {
                        return Err(CliError::Usage(
                            "with --token the agent's rule names the project cache; \
                             --cache-commit says when the job commits, if the rule lets it"
                                .into(),
                        ));
                    }
                    let jwt = match file.to_str() {
                        Some("-") => std::io::read_to_string(std::io::stdin()),
                        _ => std::fs::read_to_string(&file),
                    }
                    .map_err(|e| CliError::Usage(format!("--token {}: {e}", file.display())))?;
                    spec.insert("token".into(), jwt.trim().into());
                    let host = agent
                        .endpoint
                        .rsplit_once(':')
                        .map_or(agent.endpoint.as_str(), |(h, _)| h);
                    let at = token_endpoint.unwrap_or_else(|| format!("{host}:2377"));
                    let ca = ca.unwrap_or_else(|| agent.certs_dir.join("ca.pem"));
                    crate::client::exchange(&at, &ca, &spec.into()).await?
                }
                None => create_with_admin(&agent, spec, labels, memory_bytes, disk_bytes).await?,
            };
            let dir = out.unwrap_or_else(|| PathBuf::from(format!("berth-job-{}", created.id)));
            crate::pki::Bundle {
                ca_pem: created.ca.clone(),
                cert_pem: created.cert.clone(),
                key_pem: created.key.clone(),
            }
            .write_to(&dir)?;
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": created.id,
                        "endpoint": created.endpoint,
                        "address": created.address,
                        "ports": created.ports,
                        "expires_at": created.expires_at,
                        "cert_path": dir,
                        "ca": dir.join("ca.pem"),
                        "cert": dir.join("cert.pem"),
                        "key": dir.join("key.pem"),
                    })
                );
            } else {
                println!(
                    "export DOCKER_HOST={} DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH={}",
                    created.endpoint,
                    dir.display()
                );
            }
            Ok(())
        }
        JobCmd::Ls { agent, json } => {
            let client = crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?;
            let jobs = client.list().await?;
            if json {
                println!("{}", serde_json::Value::from(jobs));
            } else {
                println!("{:<14} {:<12} {:<12} LABELS", "ID", "STATUS", "EXPIRES_IN");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                for j in jobs {
                    let left = j["expires_at"].as_u64().unwrap_or(0).saturating_sub(now);
                    println!(
                        "{:<14} {:<12} {:<12} {}",
                        j["id"].as_str().unwrap_or(""),
                        j["status"].as_str().unwrap_or(""),
                        format!("{left}s"),
                        j["labels"]
                    );
                }
                let pool = client.pool().await?;
                if pool["size"].as_u64().unwrap_or(0) > 0 {
                    print!("warm pool: {} of {} ready", pool["ready"], pool["size"]);
                    match pool["last_error"].as_str() {
                        Some(e) => println!(
                            "; {} start(s) failed in a row, next try in {}s: {e}",
                            pool["failures"], pool["retry_in_secs"]
                        ),
                        None => println!(),
                    }
                }
            }
            Ok(())
        }
        JobCmd::End {
            endpoint,
            cert_path,
            outcome,
        } => {
            let at = endpoint.strip_prefix("tcp://").unwrap_or(&endpoint);
            let client = crate::client::AgentClient::with_bundle(at, &cert_path)?;
            client.end_own_job(outcome.as_deref()).await?;
            println!("ended");
            Ok(())
        }
        JobCmd::Rm { agent, id, outcome } => {
            let client = crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?;
            client.delete_with(&id, outcome.as_deref()).await?;
            println!("removed {id}");
            Ok(())
        }
        JobCmd::Audit { agent, id, json } => {
            let client = crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?;
            let lines = client.audit(&id).await?;
            if json {
                print!("{lines}");
                return Ok(());
            }
            println!(
                "{:<24} {:<8} {:<6} {:>10} {:>10} {:>7}  REQUEST",
                "TIME (UTC)", "DECISION", "STATUS", "TO DAEMON", "TO CLIENT", "MS"
            );
            for l in lines.lines() {
                let Ok(r) = serde_json::from_str::<crate::audit::Record>(l) else {
                    continue;
                };
                let when = time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(r.ts_ms) * 1_000_000,
                )
                .map(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                })
                .unwrap_or_default();
                let what = match r.event.as_str() {
                    "request" => format!("{} {}", r.method, r.target),
                    other => format!("({other} by {} {})", r.identity, r.client),
                };
                let decision = match &r.rule {
                    Some(rule) => format!("{}:{rule}", r.decision),
                    None => r.decision.clone(),
                };
                println!(
                    "{:<24} {:<8} {:<6} {:>10} {:>10} {:>7}  {what}",
                    when.get(..23).unwrap_or(&when),
                    decision,
                    if r.status == 0 {
                        String::new()
                    } else {
                        r.status.to_string()
                    },
                    r.bytes_to_daemon,
                    r.bytes_to_client,
                    r.duration_ms
                );
            }
            Ok(())
        }
    }
}

/// `POST /berth/v1/jobs` with the admin bundle.
async fn create_with_admin(
    agent: &AgentArgs,
    mut spec: serde_json::Map<String, serde_json::Value>,
    labels: Vec<String>,
    memory_bytes: Option<u64>,
    disk_bytes: Option<u64>,
) -> Result<crate::frontdoor::api::Created, CliError> {
    let client = crate::client::AgentClient::new(&agent.endpoint, &agent.certs_dir)?;
    let mut l = serde_json::Map::new();
    for kv in labels {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--label {kv:?}: expected KEY=VALUE")))?;
        l.insert(k.into(), v.into());
    }
    spec.insert("labels".into(), l.into());
    let mut limits = serde_json::Map::new();
    if let Some(m) = memory_bytes {
        limits.insert("memory_bytes".into(), m.into());
    }
    if let Some(d) = disk_bytes {
        limits.insert("disk_bytes".into(), d.into());
    }
    if !limits.is_empty() {
        spec.insert("limits".into(), limits.into());
    }
    Ok(client.create(&spec.into()).await?)
}

/// Why an agent's capacity falls short of what was asked, if it does.
fn capacity_short(
    c: &crate::jobs::Capacity,
    min_free: usize,
    min_memory_bytes: Option<u64>,
) -> Option<String> {
    if c.shutting_down {
        return Some("full: the agent is shutting down".into());
    }
    if c.free < min_free.max(1) {
        return Some(format!("full: room for {} jobs, {min_free} asked", c.free));
    }
    match min_memory_bytes {
        Some(m) if c.memory_available_bytes < m => Some(format!(
            "full: {} MiB available, {} MiB asked",
            c.memory_available_bytes >> 20,
            m >> 20
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_shipped_configuration_file_parses_and_validates() {
        let cfg: FileConfig = toml::from_str(include_str!("../deploy/berth.toml")).unwrap();
        cfg.sandbox.validate().unwrap();
        cfg.serve.validate().unwrap();
        assert_eq!(cfg.serve.listen.port(), 2376);
        // "every key with its default", written the one current way.
        let (d, s) = (crate::frontdoor::ServeConfig::default(), &cfg.serve);
        assert_eq!(
            (s.default_ttl, s.max_ttl, s.drain, s.audit_retention),
            (d.default_ttl, d.max_ttl, d.drain, d.audit_retention)
        );
        let sd = SandboxConfig::default();
        assert_eq!(
            (
                cfg.sandbox.stop_grace,
                cfg.sandbox.health_interval,
                cfg.sandbox.ready_timeout
            ),
            (sd.stop_grace, sd.health_interval, sd.ready_timeout)
        );
        let doc: toml::Table = toml::from_str(include_str!("../deploy/berth.toml")).unwrap();
        assert_eq!(crate::duration::deprecated_keys(&doc), Vec::<String>::new());
    }

    #[test]
    fn capacity_falls_short_for_a_reason() {
        let c = crate::jobs::Capacity {
            accepting: true,
            free: 2,
            free_ranges: 1,
            uid_ranges: 8,
            warm_ready: 1,
            warm_pool: 1,
            jobs: 6,
            memory_available_bytes: 4 << 30,
            job_memory_bytes: Some(1 << 30),
            shutting_down: false,
            bounds: Vec::new(),
            limits: Vec::new(),
        };
        assert_eq!(capacity_short(&c, 1, None), None);
        assert_eq!(capacity_short(&c, 2, Some(4 << 30)), None);
        assert!(
            capacity_short(&c, 3, None)
                .unwrap()
                .contains("room for 2 jobs")
        );
        // 0 asked still means "one more".
        let full = crate::jobs::Capacity {
            free: 0,
            ..c.clone()
        };
        assert!(capacity_short(&full, 0, None).is_some());
        assert!(
            capacity_short(&c, 1, Some(5 << 30))
                .unwrap()
                .contains("4096 MiB available")
        );
        let closing = crate::jobs::Capacity {
            shutting_down: true,
            ..c
        };
        assert!(
            capacity_short(&closing, 1, None)
                .unwrap()
                .contains("shutting down")
        );
    }

    #[test]
    fn the_token_section_reaches_the_front_door_and_bad_entries_are_named() {
        let dir = std::env::temp_dir().join(format!("berth-cli-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("berth.toml");
        let args = EngineArgs {
            config: Some(path.clone()),
            state_dir: None,
        };
        let section = "[token]\nenabled = true\nlisten = \"127.0.0.1:2377\"\n\
             [[token.issuers]]\nissuer = \"https://gitlab.example\"\njwks_file = \"/etc/berth/gitlab.json\"\n\
             [[token.rules]]\nname = \"main\"\nissuer = \"https://gitlab.example\"\nclaims = { ref_protected = \"true\" }\n";
        std::fs::write(&path, section).unwrap();
        let serve = load_file(&args).unwrap().serve;
        assert!(serve.token.enabled);
        assert_eq!(serve.token.rules[0].claims["ref_protected"], "true");
        serve.validate().unwrap();
        // The front door's own port is not the token listener's.
        std::fs::write(
            &path,
            format!("[serve]\nlisten = \"0.0.0.0:2377\"\n{section}"),
        )
        .unwrap();
        let e = load_file(&args)
            .unwrap()
            .serve
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("token.listen"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn san_flags_add_to_the_configurations_names() {
        let cli =
            Cli::try_parse_from(["berth", "serve", "--san", "10.0.0.7", "--san", "ci.example"])
                .unwrap();
        let Command::Serve { front, .. } = cli.command else {
            panic!("not serve")
        };
        let serve = front.apply(crate::frontdoor::ServeConfig {
            san: vec!["ci.example".into()],
            ..Default::default()
        });
        assert_eq!(serve.san, ["ci.example", "10.0.0.7"]);
    }

    #[test]
    fn old_duration_keys_still_load() {
        let cfg: FileConfig = toml::from_str(
            "[serve]\ndrain_secs = 5\nmax_ttl_secs = 7200\ndefault_ttl = \"30m\"\n\
             [sandbox]\nstop_grace = 1.5\n",
        )
        .unwrap();
        assert_eq!(cfg.serve.drain, Duration::from_secs(5));
        assert_eq!(cfg.serve.max_ttl, Duration::from_secs(7200));
        assert_eq!(cfg.serve.default_ttl, Duration::from_secs(1800));
        assert_eq!(cfg.sandbox.stop_grace, Duration::from_millis(1500));
        cfg.serve.validate().unwrap();
        // Both spellings of one key: refused, not silently one of them.
        assert!(toml::from_str::<FileConfig>("[serve]\ndrain_secs = 5\ndrain = \"5s\"\n").is_err());
    }

    #[test]
    fn the_registries_section_reaches_the_engine_and_bad_entries_are_named() {
        let dir = std::env::temp_dir().join(format!("berth-cli-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("berth.toml");
        let args = |p: &Path| EngineArgs {
            config: Some(p.to_path_buf()),
            state_dir: None,
        };
        std::fs::write(
            &path,
            "[registries]\nmirrors = [\"http://10.0.0.1:5000\"]\ninsecure = [\"10.0.0.1:5000\"]\n",
        )
        .unwrap();
        let cfg = load_config(&args(&path)).unwrap();
        assert_eq!(cfg.registries.mirrors, ["http://10.0.0.1:5000"]);
        assert_eq!(cfg.registries.insecure, ["10.0.0.1:5000"]);
        std::fs::write(&path, "[registries]\nmirrors = [\"mirror.example:5000\"]\n").unwrap();
        let e = load_config(&args(&path)).unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("registries.mirrors[0]"), "{e}");
        std::fs::write(&path, "[registries]\nmirror = []\n").unwrap();
        let e = load_config(&args(&path)).unwrap_err().to_string();
        assert!(e.contains("mirror"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_cache_section_reaches_the_engine_and_bad_entries_are_named() {
        let dir = std::env::temp_dir().join(format!("berth-cli-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("berth.toml");
        let args = EngineArgs {
            config: Some(path.clone()),
            state_dir: None,
        };
        std::fs::write(
            &path,
            "[cache]\nenabled = true\nupstream = \"https://registry.example\"\nmax_bytes = 1073741824\n",
        )
        .unwrap();
        let cfg = load_config(&args).unwrap();
        assert!(cfg.cache.enabled);
        assert_eq!(cfg.cache.max_bytes, 1 << 30);
        // The pool's last /30 is the cache's, not a job's.
        assert_eq!(cfg.cache_addr().unwrap().to_string(), "10.213.255.253:5000");
        for (text, key) in [
            (
                "[cache]\nenabled = true\nmax_bytes = 1000\n",
                "cache.max_bytes",
            ),
            ("[cache]\nupstream = \"ftp://x\"\n", "cache.upstream"),
            ("[cache]\nusername = \"ci\"\n", "cache.password_file"),
            ("[cache]\nenable = true\n", "enable"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load_config(&args).unwrap_err();
            assert_eq!(e.exit_code(), 64, "{text}: {e}");
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(size_text(0), "0 MiB");
        assert_eq!(size_text(1), "1 MiB");
        assert_eq!(size_text(474 << 20), "474 MiB");
        assert_eq!(size_text(5_376_389_120), "5.0 GiB");
    }

    #[test]
    fn configuration_errors_exit_64() {
        let e = CliError::Sandbox(SandboxError::Config(
            crate::sandbox::config::ConfigError::Invalid {
                key: "uid_base",
                why: "x".into(),
            },
        ));
        assert_eq!(e.exit_code(), 64);
        // berth run's embedded agent exits as berth serve would.
        let missing = |e: SandboxError| CliError::Run(crate::runner::RunError::Sandbox(e));
        assert_eq!(
            missing(SandboxError::Prerequisite("x".into())).exit_code(),
            69
        );
        assert_eq!(
            CliError::Sandbox(SandboxError::Prerequisite("x".into())).exit_code(),
            69
        );
        let bad: Result<FileConfig, _> = toml::from_str("[sandbox]\nuid_bse = 1\n");
        assert!(bad.err().unwrap().to_string().contains("uid_bse"));
    }
}
