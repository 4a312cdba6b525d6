//! Command line: `berth sandbox up|recover` today; the parsing and the exit
//! codes, nothing of the engine's logic.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::sandbox::{Engine, Limits, SandboxConfig, SandboxError, Status};

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "Docker-in-Docker CI build agent: one real dockerd per job, in its own user namespaces"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run and manage job sandboxes directly (no TLS front door).
    #[command(subcommand)]
    Sandbox(SandboxCmd),
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
    #[error("{0}")]
    Job(String),
}

impl CliError {
    /// Exit code: 64 (EX_USAGE) for configuration errors, 69 (EX_UNAVAILABLE)
    /// for missing prerequisites, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::ConfigRead { .. }
            | CliError::ConfigParse { .. }
            | CliError::Sandbox(SandboxError::Config(_)) => 64,
            CliError::Sandbox(SandboxError::Prerequisite(_)) => 69,
            _ => 1,
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    sandbox: SandboxConfig,
}

pub fn load_config(args: &EngineArgs) -> Result<SandboxConfig, CliError> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::ConfigRead {
                path: path.clone(),
                source,
            })?;
            toml::from_str::<FileConfig>(&text)
                .map_err(|source| CliError::ConfigParse {
                    path: path.clone(),
                    source,
                })?
                .sandbox
        }
        None => SandboxConfig::default(),
    };
    if let Some(d) = &args.state_dir {
        cfg.state_dir = d.clone();
    }
    cfg.validate().map_err(SandboxError::from)?;
    Ok(cfg)
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
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
    let sb = engine.start(Some(limits)).await?;
    println!("job {} ready in {:.0?}", sb.id(), sb.age());
    println!("export DOCKER_HOST=unix://{}", sb.socket().display());
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| CliError::Job(e.to_string()))?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        s = sb.ended() => Some(s),
    };
    let t = engine.teardown(sb.id()).await?;
    println!("job {} torn down in {:.0?}", t.id, t.took);
    match outcome {
        Some(Status::Failed(why)) => Err(CliError::Job(format!("job {} failed: {why}", sb.id()))),
        _ => Ok(()),
    }
}
