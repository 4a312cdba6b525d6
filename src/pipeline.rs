//! Pipeline files for `berth run`: TOML, a name, optional environment for
//! every step, and steps, each a shell command with its own environment and
//! timeout. Steps run in the pipeline file's directory with the job's
//! `DOCKER_*` variables set.
//!
//! ```toml
//! name = "hello"
//! ttl = "30m"                 # job lifetime (default: sum of step timeouts + 5m)
//! workspaces = [".", "../cache:root"]   # bound into the job at their own
//!                             # path (relative to this file; default: its directory)
//! emulation = false           # no foreign binaries (arm64) through the host's
//!                             # emulators (default: the agent's host_emulation)
//! [env]
//! APP = "hello-app"
//!
//! [cache]                     # the project cache the job starts from
//! key = "org/app"             # and commits to when every step passed
//! commit = "on-success"       # always | never
//! # from = "org/app"          # instead of key: start from it, never commit
//!
//! [[step]]
//! name = "build"
//! run = "docker build -t $APP:1 apps/hello"
//! timeout = "10m"            # default 30m
//! env = { BUILDKIT_PROGRESS = "plain" }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::jobs::CacheCommit;
use crate::sandbox::WorkspaceRequest;
use crate::sandbox::fs::caches::Key;

pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Variables berth sets for every step; a pipeline may not override them.
pub const RESERVED: [&str; 5] = [
    "DOCKER_HOST",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "BERTH_JOB_ID",
    "BERTH_JOB_ADDR",
];

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read pipeline {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pipeline {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("pipeline {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    workspaces: Option<Vec<String>>,
    #[serde(default)]
    emulation: Option<bool>,
    #[serde(default, rename = "step")]
    steps: Vec<RawStep>,
    #[serde(default)]
    cache: Option<Cache>,
}

/// `[cache]`: the project cache the pipeline's job starts from, and when
/// it commits (on success: every step passed). The agent checks the same
/// fields of the job API.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    #[serde(default)]
    pub key: Option<Key>,
    #[serde(default)]
    pub commit: Option<CacheCommit>,
    #[serde(default)]
    pub from: Option<Key>,
}

impl Cache {
    /// What does not go together, said as the file says it.
    pub fn check(&self) -> Result<(), String> {
        match (&self.key, &self.commit, &self.from) {
            (Some(_), _, Some(_)) => Err("key and from exclude each other: a job reads and \
                                          commits one key, or reads one without committing"
                .into()),
            (None, Some(_), _) => {
                Err("commit needs key (a job started from `from` never commits)".into())
            }
            (None, None, None) => Err("names no key: give key or from".into()),
            _ => Ok(()),
        }
    }

    /// The fields of a job API request.
    pub fn request(&self) -> serde_json::Value {
        serde_json::json!({
            "cache_key": self.key,
            "cache_commit": self.commit,
            "cache_from": self.from,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    run: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub run: String,
    /// Pipeline environment overlaid with the step's own.
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// Directory steps run in (the pipeline file's).
    pub dir: PathBuf,
    pub ttl: Duration,
    /// Host directories bound into the job at their own path: those the
    /// file names, or (None) its own directory.
    pub workspaces: Option<Vec<WorkspaceRequest>>,
    /// Whether its job runs foreign binaries through the host's emulators
    /// (None: the agent's choice).
    pub emulation: Option<bool>,
    pub steps: Vec<Step>,
    /// The project cache of its job.
    pub cache: Option<Cache>,
}

fn valid_env_name(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(ch) if ch == '_' || ch.is_ascii_alphabetic())
        && c.all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
}

impl Pipeline {
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read {
            path: path.into(),
            source,
        })?;
        let dir = std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."));
        Pipeline::parse(&text, path, dir)
    }

    pub fn parse(text: &str, path: &Path, dir: PathBuf) -> Result<Pipeline, PipelineError> {
        let raw: RawPipeline = toml::from_str(text).map_err(|source| PipelineError::Parse {
            path: path.into(),
            source,
        })?;
        let invalid = |what: String| PipelineError::Invalid {
            path: path.into(),
            what,
        };
        if raw.name.trim().is_empty() {
            return Err(invalid("name must not be empty".into()));
        }
        if raw.steps.is_empty() {
            return Err(invalid("no steps: add at least one [[step]]".into()));
        }
        let check_env = |env: &BTreeMap<String, String>, whose: &str| {
            for k in env.keys() {
                if !valid_env_name(k) {
                    return Err(invalid(format!(
                        "{whose}: {k:?} is not a valid variable name"
                    )));
                }
                if RESERVED.contains(&k.as_str()) {
                    return Err(invalid(format!(
                        "{whose}: {k} is set by berth for the job and cannot be overridden"
                    )));
                }
            }
            Ok(())
        };
        check_env(&raw.env, "env")?;
        let mut steps = Vec::new();
        let mut total = Duration::ZERO;
        for (i, s) in raw.steps.into_iter().enumerate() {
            let whose = format!("step {} ({:?})", i + 1, s.name);
            if s.name.trim().is_empty() {
                return Err(invalid(format!("step {}: name must not be empty", i + 1)));
            }
            if steps.iter().any(|x: &Step| x.name == s.name) {
                return Err(invalid(format!("{whose}: two steps have this name")));
            }
            if s.run.trim().is_empty() {
                return Err(invalid(format!("{whose}: run must not be empty")));
            }
            check_env(&s.env, &whose)?;
            let timeout = match &s.timeout {
                Some(t) => duration::parse(t, &format!("pipeline {whose}: timeout"))
                    .map_err(|e| invalid(format!("{whose}: timeout: {e}")))?,
                None => DEFAULT_STEP_TIMEOUT,
            };
            if timeout.is_zero() {
                return Err(invalid(format!("{whose}: timeout must be positive")));
            }
            total += timeout;
            let mut env = raw.env.clone();
            env.extend(s.env);
            steps.push(Step {
                name: s.name,
                run: s.run,
                env,
                timeout,
            });
        }
        let ttl = match &raw.ttl {
            Some(t) => {
                duration::parse(t, "pipeline ttl").map_err(|e| invalid(format!("ttl: {e}")))?
            }
            None => total + Duration::from_secs(300),
        };
        let workspaces = match raw.workspaces {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|w| {
                        let abs = dir.join(w).to_string_lossy().into_owned();
                        let mut r: WorkspaceRequest = abs
                            .parse()
                            .map_err(|e| invalid(format!("workspaces: {e}")))?;
                        r.path = lexical(&r.path);
                        Ok(r)
                    })
                    .collect::<Result<_, PipelineError>>()?,
            ),
        };
        if let Some(c) = &raw.cache {
            c.check().map_err(|e| invalid(format!("[cache]: {e}")))?;
        }
        Ok(Pipeline {
            name: raw.name,
            dir,
            ttl,
            workspaces,
            emulation: raw.emulation,
            steps,
            cache: raw.cache,
        })
    }
}

/// `p` with `.` and `..` resolved by name (the agent resolves links).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspaces_are_relative_to_the_file_and_keep_their_owner_choice() {
        let p = parse("name = \"x\"\nworkspaces = [\".\", \"../cache:root\", \"/srv/ws:1001\"]\n[[step]]\nname = \"a\"\nrun = \"true\"\n").unwrap();
        let w = p.workspaces.unwrap();
        assert_eq!(w[0].path, Path::new("/x"));
        assert_eq!(
            (w[1].path.as_path(), w[1].as_uid),
            (Path::new("/cache"), Some(0))
        );
        assert_eq!(
            (w[2].path.as_path(), w[2].as_uid),
            (Path::new("/srv/ws"), Some(1001))
        );
        let none = parse("name = \"x\"\n[[step]]\nname = \"a\"\nrun = \"true\"\n").unwrap();
        assert_eq!(none.workspaces, None);
    }

    fn parse(t: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse(t, Path::new("p.toml"), PathBuf::from("/x"))
    }

    #[test]
    fn emulation_is_the_agents_unless_the_file_says() {
        let step = "[[step]]\nname = \"a\"\nrun = \"true\"\n";
        let off = parse(&format!("name = \"x\"\nemulation = false\n{step}")).unwrap();
        assert_eq!(off.emulation, Some(false));
        let unsaid = parse(&format!("name = \"x\"\n{step}")).unwrap();
        assert_eq!(unsaid.emulation, None);
        let e = parse(&format!("name = \"x\"\nemulation = \"no\"\n{step}")).unwrap_err();
        assert!(e.to_string().contains("emulation"), "{e}");
    }

    #[test]
    fn parses_steps_with_merged_env_and_timeouts() {
        let p = parse(
            r#"
name = "demo"
[env]
A = "1"
B = "2"
[[step]]
name = "one"
run = "true"
env = { B = "3" }
timeout = "90s"
[[step]]
name = "two"
run = "echo"
"#,
        )
        .unwrap();
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.steps[0].env["B"], "3");
        assert_eq!(p.steps[0].env["A"], "1");
        assert_eq!(p.steps[0].timeout, Duration::from_secs(90));
        assert_eq!(p.steps[1].timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(
            p.ttl,
            Duration::from_secs(90) + DEFAULT_STEP_TIMEOUT + Duration::from_secs(300)
        );
    }

    #[test]
    fn a_cache_names_one_key_and_commits_only_with_key() {
        let with = |cache: &str| {
            parse(&format!(
                "name = \"x\"\n{cache}\n[[step]]\nname = \"a\"\nrun = \"true\"\n"
            ))
        };
        let p = with("[cache]\nkey = \"org/app\"").unwrap();
        let c = p.cache.unwrap();
        assert_eq!(c.key.unwrap().as_str(), "org/app");
        assert_eq!(c.commit, None);
        let c = with("[cache]\nkey = \"org/app\"\ncommit = \"always\"")
            .unwrap()
            .cache
            .unwrap();
        assert_eq!(c.commit, Some(CacheCommit::Always));
        assert!(with("[cache]\nfrom = \"org/app\"").is_ok());
        for (bad, why) in [
            ("[cache]\nkey = \"a\"\nfrom = \"b\"", "exclude each other"),
            (
                "[cache]\nfrom = \"a\"\ncommit = \"always\"",
                "commit needs key",
            ),
            ("[cache]", "names no key"),
            ("[cache]\nkey = \"\"", "empty"),
            (
                "[cache]\nkey = \"a\"\ncommit = \"sometimes\"",
                "unknown variant",
            ),
            ("[cache]\nkeys = \"a\"", "unknown field"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let c = Cache {
            key: Some(Key::new("k").unwrap()),
            commit: None,
            from: None,
        };
        assert_eq!(
            c.request(),
            serde_json::json!({"cache_key": "k", "cache_commit": null, "cache_from": null})
        );
    }

    #[test]
    fn errors_name_the_step_and_the_key() {
        let e = parse("name = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("no steps"), "{e}");
        let e = parse("name = \"x\"\n[[step]]\nname = \"a\"\nrun = \"true\"\ntimeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("step 1") && e.contains("timeout"), "{e}");
        let e = parse(
            "name = \"x\"\n[[step]]\nname = \"a\"\nrun = \"true\"\nenv = { DOCKER_HOST = \"y\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("DOCKER_HOST"), "{e}");
        let e = parse("name = \"x\"\n[[step]]\nname = \"a\"\nrun = \"true\"\nrnu = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rnu"), "{e}");
        let e = parse("name = \"x\"\n[[step]]\nname = \"a\"\nrun = \"true\"\n[[step]]\nname = \"a\"\nrun = \"true\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("two steps"), "{e}");
    }
}
