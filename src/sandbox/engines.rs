//! The engine every job runs: dockerd, the containerd it starts and the runc
//! that containerd's shim runs, found and versioned once before any job
//! starts. dockerd finds containerd, runc, docker-proxy and docker-init by
//! name on its PATH, so the configured parts' directories come first on the
//! PATH each job's dockerd gets; what berth passes to dockerd follows the
//! versions read here, never the text of an error.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

/// The PATH every job's dockerd gets after the engine's own directories.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The oldest dockerd berth runs: the first with cgroup v2 support and the
/// `--exec-root`/`--data-root` split berth relies on, and the engine of the
/// oldest supported Debian (12).
pub const MIN_DOCKERD: Version = Version {
    major: 20,
    minor: 10,
    patch: 0,
};

/// A release number as `--version` prints it (`20.10.24+dfsg1`,
/// `1.7.24~ds1`): what follows the third number is packaging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// The first `N.N` or `N.N.N` token in `text` (a line such as
    /// `Docker version 26.1.5+dfsg1, build 411e817`).
    pub fn find(text: &str) -> Option<Version> {
        Version::find_printed(text).map(|(v, _)| v)
    }

    /// The version and the token it was read from (`20.10.24+dfsg1`).
    fn find_printed(text: &str) -> Option<(Version, &str)> {
        text.split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|t| Version::parse_token(t).map(|v| (v, t)))
    }

    fn parse_token(token: &str) -> Option<Version> {
        let token = token.strip_prefix('v').unwrap_or(token);
        let numeric = token
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .map_or(token, |end| &token[..end]);
        let mut parts = numeric.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            None | Some("") => 0,
            Some(p) => p.parse().ok()?,
        };
        Some(Version {
            major,
            minor,
            patch,
        })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch).cmp(&(other.major, other.minor, other.patch))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "{key}: {path} cannot run: {source} (install Debian's docker.io, or set sandbox.{key})"
    )]
    Run {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: `{path} --version` printed no version number: {output:?}")]
    NoVersion {
        key: &'static str,
        path: PathBuf,
        output: String,
    },
    #[error(
        "dockerd: {path} is version {version}; berth needs {MIN_DOCKERD} or later \
         (jobs rely on its cgroup v2 support and its data-root and exec-root flags); \
         install Debian's docker.io or point sandbox.dockerd at a newer engine"
    )]
    TooOld { path: PathBuf, version: String },
    #[error(
        "{key}: no file named {name} on the engine's PATH ({path}); \
         install Debian's docker.io or set sandbox.{key}"
    )]
    Missing {
        key: &'static str,
        name: &'static str,
        path: String,
    },
    #[error(
        "{key}: {path} must be a file named {name}: dockerd and containerd look it up by that name"
    )]
    Name {
        key: &'static str,
        path: PathBuf,
        name: &'static str,
    },
    #[error(
        "{key}: {want} would not be used: {found} comes first on the engine's PATH; \
         move one of them or set sandbox.{key} to it"
    )]
    Shadowed {
        key: &'static str,
        want: PathBuf,
        found: PathBuf,
    },
}

impl EngineError {
    /// The `[sandbox]` key of the part at fault.
    pub fn key(&self) -> &'static str {
        match self {
            EngineError::Run { key, .. }
            | EngineError::NoVersion { key, .. }
            | EngineError::Missing { key, .. }
            | EngineError::Name { key, .. }
            | EngineError::Shadowed { key, .. } => key,
            EngineError::TooOld { .. } => "dockerd",
        }
    }
}

/// One part of the engine: where it is and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub path: PathBuf,
    pub version: Version,
    /// The version as the part printed it (`20.10.24+dfsg1`).
    pub release: String,
}

/// The engine as found: its three parts and the PATH its dockerd runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub dockerd: Part,
    pub containerd: Part,
    pub runc: Part,
    /// PATH for the job's dockerd: the parts' own directories first.
    pub path: String,
}

/// Where the parts are to be found: the settings of `[sandbox]` (an empty
/// path takes the part named `containerd` or `runc` on the engine's PATH).
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub dockerd: &'a Path,
    pub containerd: &'a Path,
    pub runc: &'a Path,
}

impl Wanted<'_> {
    /// The PATH the job's dockerd gets: the directories of the configured
    /// runc, containerd and dockerd (in that order, so an engine prefix that
    /// has no runc of its own takes the host's), then the system's.
    pub fn search_path(&self) -> String {
        let mut dirs: Vec<String> = Vec::new();
        for p in [self.runc, self.containerd, self.dockerd] {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                let d = d.to_string_lossy().into_owned();
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
        for d in SYSTEM_PATH.split(':') {
            if !dirs.iter().any(|x| x == d) {
                dirs.push(d.to_string());
            }
        }
        dirs.join(":")
    }

    /// Finds every part, checks that dockerd will use the configured ones,
    /// and reads their versions (the three `--version` calls run at once).
    pub fn probe(&self) -> Result<Engine, EngineError> {
        self.probe_with(&Remembered::default())
    }

    /// As [`Wanted::probe`], but a part whose file is the one `file`
    /// remembers (same device, inode, size, modification and change time)
    /// is not run again: `dockerd --version` alone is 30 ms of every
    /// `berth run`. What was read is remembered there for the next agent.
    pub fn probe_remembering(&self, file: &Path) -> Result<Engine, EngineError> {
        let before = Remembered::load(file);
        let engine = self.probe_with(&before)?;
        let now = Remembered::of(&engine);
        if now != before
            && let Err(e) = now.save(file)
        {
            tracing::debug!(file = %file.display(), error = %e, "engine versions not remembered");
        }
        Ok(engine)
    }

    fn probe_with(&self, known: &Remembered) -> Result<Engine, EngineError> {
        let path = self.search_path();
        let containerd = resolve("containerd", "containerd", self.containerd, &path)?;
        let runc = resolve("runc", "runc", self.runc, &path)?;
        let version_of = |key, path: &Path| match known.release_of(path) {
            Some(found) => Ok(found),
            None => version_of(key, path),
        };
        let (d, c, r) = std::thread::scope(|s| {
            let c = s.spawn(|| version_of("containerd", &containerd));
            let r = s.spawn(|| version_of("runc", &runc));
            let d = version_of("dockerd", self.dockerd);
            (d, c.join(), r.join())
        });
        type Probed = Result<(Version, String), EngineError>;
        let joined =
            |r: std::thread::Result<Probed>| r.unwrap_or_else(|p| std::panic::resume_unwind(p));
        let dockerd = Part::new(self.dockerd.to_path_buf(), d?);
        if dockerd.version < MIN_DOCKERD {
            return Err(EngineError::TooOld {
                path: dockerd.path,
                version: dockerd.release,
            });
        }
        Ok(Engine {
            dockerd,
            containerd: Part::new(containerd, joined(c)?),
            runc: Part::new(runc, joined(r)?),
            path,
        })
    }
}

impl Part {
    fn new(path: PathBuf, (version, release): (Version, String)) -> Part {
        Part {
            path,
            version,
            release,
        }
    }
}

impl Engine {
    /// Whether this dockerd applies `default-network-opts` (24.0 on): with
    /// it, networks a job creates get the link's MTU too.
    pub fn has_default_network_opts(&self) -> bool {
        self.dockerd.version.major >= 24
    }

    /// One line for logs and `berth doctor`.
    pub fn describe(&self) -> String {
        format!(
            "dockerd {} ({}), containerd {} ({}), runc {} ({})",
            self.dockerd.release,
            self.dockerd.path.display(),
            self.containerd.release,
            self.containerd.path.display(),
            self.runc.release,
            self.runc.path.display()
        )
    }
}

/// Which file a path names now: a package upgrade or a copy over it
/// changes at least one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The versions read from the engine's files, by file.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Remembered {
    parts: Vec<Known>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Known {
    path: PathBuf,
    file: FileId,
    /// As the part printed it (`20.10.24+dfsg1`).
    release: String,
}

impl Remembered {
    /// What `file` holds; nothing when it is missing or unreadable.
    fn load(file: &Path) -> Remembered {
        std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn of(engine: &Engine) -> Remembered {
        let parts = [&engine.dockerd, &engine.containerd, &engine.runc]
            .into_iter()
            .filter_map(|p| {
                Some(Known {
                    path: p.path.clone(),
                    file: FileId::of(&p.path)?,
                    release: p.release.clone(),
                })
            })
            .collect();
        Remembered { parts }
    }

    fn save(&self, file: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::write_atomic(file, &json, 0o600)
    }

    /// The version of the file at `path`, if it is still the file it was.
    fn release_of(&self, path: &Path) -> Option<(Version, String)> {
        let now = FileId::of(path)?;
        self.parts
            .iter()
            .find(|k| k.path == path && k.file == now)
            .and_then(|k| Some((Version::parse_token(&k.release)?, k.release.clone())))
    }
}

/// The file dockerd will run as `name`: the first executable of that name
/// on `path`; where `configured` is set, it must be that one.
fn resolve(
    key: &'static str,
    name: &'static str,
    configured: &Path,
    path: &str,
) -> Result<PathBuf, EngineError> {
    if !configured.as_os_str().is_empty() && configured.file_name() != Some(name.as_ref()) {
        return Err(EngineError::Name {
            key,
            path: configured.into(),
            name,
        });
    }
    let found = crate::files::find_on(name, path.as_ref()).ok_or_else(|| EngineError::Missing {
        key,
        name,
        path: path.into(),
    })?;
    if configured.as_os_str().is_empty() {
        return Ok(found);
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if !same(&found, configured) {
        return Err(EngineError::Shadowed {
            key,
            want: configured.into(),
            found,
        });
    }
    Ok(configured.into())
}

/// The first executable regular file `name` in the directories of `path`.
fn version_of(key: &'static str, path: &Path) -> Result<(Version, String), EngineError> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .env_clear()
        // A Go part collects garbage while its packages initialise, before
        // it prints a line and exits: a third of dockerd's 45 ms here.
        .env("GOGC", "off")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| EngineError::Run {
            key,
            path: path.into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    match Version::find_printed(first) {
        Some((v, printed)) if out.status.success() => Ok((v, printed.to_string())),
        _ => Err(EngineError::NoVersion {
            key,
            path: path.into(),
            output: format!("{}{}", text, String::from_utf8_lossy(&out.stderr))
                .chars()
                .take(300)
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn v(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn versions_are_read_from_what_each_part_prints() {
        for (text, want) in [
            (
                "Docker version 20.10.24+dfsg1, build 297e128",
                v(20, 10, 24),
            ),
            ("Docker version 26.1.5+dfsg1, build 411e817", v(26, 1, 5)),
            ("Docker version 27.5.1, build 9f9e405", v(27, 5, 1)),
            (
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1",
                v(1, 7, 24),
            ),
            (
                "containerd containerd.io v1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da",
                v(1, 7, 27),
            ),
            ("runc version 1.1.5+ds1", v(1, 1, 5)),
            ("runc version 1.2", v(1, 2, 0)),
        ] {
            assert_eq!(Version::find(text), Some(want), "{text}");
        }
        for text in ["dockerd: command not found", "", "Docker version x.y"] {
            assert_eq!(Version::find(text), None, "{text}");
        }
    }

    #[test]
    fn versions_order_by_number_not_text() {
        assert!(v(20, 10, 24) > MIN_DOCKERD);
        assert!(v(20, 9, 99) < MIN_DOCKERD);
        assert!(v(19, 3, 15) < MIN_DOCKERD);
        assert!(v(26, 1, 5) > v(20, 10, 24));
        assert!(v(1, 10, 0) > v(1, 9, 0));
    }

    #[test]
    fn the_parts_directories_come_first_on_dockerds_path() {
        let w = Wanted {
            dockerd: Path::new("/opt/e/usr/sbin/dockerd"),
            containerd: Path::new("/opt/e/usr/bin/containerd"),
            runc: Path::new(""),
        };
        assert_eq!(
            w.search_path(),
            format!("/opt/e/usr/bin:/opt/e/usr/sbin:{SYSTEM_PATH}")
        );
        let stock = Wanted {
            dockerd: Path::new("/usr/sbin/dockerd"),
            containerd: Path::new(""),
            runc: Path::new(""),
        };
        assert_eq!(
            stock.search_path(),
            "/usr/sbin:/usr/local/sbin:/usr/local/bin:/usr/bin:/sbin:/bin"
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-engines-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn exe(path: &Path, script: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn an_engine_prefix_is_probed_and_an_old_dockerd_refused() {
        let d = &scratch("prefix");
        exe(
            &d.join("sbin/dockerd"),
            "echo 'Docker version 26.1.5+dfsg1, build x'",
        );
        exe(
            &d.join("bin/containerd"),
            "echo 'containerd x 1.7.24~ds1 y'",
        );
        exe(&d.join("bin/runc"), "echo 'runc version 1.1.15'");
        let (dockerd, containerd, runc) = (
            d.join("sbin/dockerd"),
            d.join("bin/containerd"),
            d.join("bin/runc"),
        );
        let w = Wanted {
            dockerd: &dockerd,
            containerd: &containerd,
            runc: &runc,
        };
        let e = w.probe().unwrap();
        assert_eq!(e.dockerd.version, v(26, 1, 5));
        assert_eq!(e.containerd.version, v(1, 7, 24));
        assert_eq!(e.runc.version, v(1, 1, 15));
        assert!(e.has_default_network_opts());
        assert!(e.path.starts_with(&format!("{}:", d.join("bin").display())));

        exe(&dockerd, "echo 'Docker version 19.03.15, build 99e3ed8'");
        let err = w.probe().unwrap_err().to_string();
        assert!(
            err.contains("19.03.15") && err.contains("20.10.0 or later"),
            "{err}"
        );

        exe(&dockerd, "echo 'no storage driver' >&2; exit 3");
        let err = w.probe().unwrap_err();
        assert!(
            matches!(err, EngineError::NoVersion { key: "dockerd", .. }),
            "{err}"
        );
    }

    #[test]
    fn versions_are_read_again_only_from_files_that_changed() {
        let d = &scratch("remember");
        let runs = d.join("runs");
        let part = |name: &str, line: &str| {
            exe(
                &d.join("bin").join(name),
                &format!("echo {name} >> {}; echo '{line}'", runs.display()),
            );
        };
        part("dockerd", "Docker version 20.10.24+dfsg1, build x");
        part("containerd", "containerd x 1.6.20~ds1 y");
        part("runc", "runc version 1.1.5+ds1");
        let (dockerd, containerd, runc) = (
            d.join("bin/dockerd"),
            d.join("bin/containerd"),
            d.join("bin/runc"),
        );
        let w = Wanted {
            dockerd: &dockerd,
            containerd: &containerd,
            runc: &runc,
        };
        let file = d.join("engine.json");
        let ran = || {
            let mut v: Vec<String> = std::fs::read_to_string(&runs)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect();
            v.sort();
            let _ = std::fs::remove_file(&runs);
            v
        };
        let first = w.probe_remembering(&file).unwrap();
        assert_eq!(ran(), ["containerd", "dockerd", "runc"]);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = w.probe_remembering(&file).unwrap();
        assert_eq!(again, first, "the same engine, as remembered");
        assert!(ran().is_empty(), "no part ran again");

        // An upgrade replaces the file: that part alone is run.
        part("dockerd", "Docker version 26.1.5+dfsg1, build y");
        let upgraded = w.probe_remembering(&file).unwrap();
        assert_eq!(ran(), ["dockerd"]);
        assert_eq!(upgraded.dockerd.version, v(26, 1, 5));
        assert_eq!(upgraded.containerd, first.containerd);

        // A file that cannot be read is no memory at all; plain probes never
        // use one.
        std::fs::write(&file, "not json").unwrap();
        w.probe_remembering(&file).unwrap();
        assert_eq!(ran(), ["containerd", "dockerd", "runc"]);
        w.probe().unwrap();
        assert_eq!(ran(), ["containerd", "dockerd", "runc"]);
    }

    #[test]
    fn a_part_that_dockerd_would_not_use_is_refused_by_name() {
        let d = &scratch("shadow");
        exe(&d.join("a/dockerd"), "echo 'Docker version 26.1.5'");
        exe(&d.join("a/runc"), "echo 'runc version 1.1.15'");
        exe(&d.join("b/containerd"), "echo 'containerd x 1.7.24'");
        exe(&d.join("b/runc"), "echo 'runc version 1.2.0'");
        exe(&d.join("c/runc-1.2"), "echo 'runc version 1.2.0'");
        let dockerd = d.join("a/dockerd");
        // runc's directory comes first, so b/runc wins over a/runc.
        let (containerd, runc) = (d.join("b/containerd"), d.join("b/runc"));
        let w = Wanted {
            dockerd: &dockerd,
            containerd: &containerd,
            runc: &runc,
        };
        assert_eq!(w.probe().unwrap().runc.path, runc);
        let runc = d.join("c/runc-1.2");
        let w = Wanted { runc: &runc, ..w };
        let err = w.probe().unwrap_err();
        assert!(
            matches!(err, EngineError::Name { key: "runc", .. }),
            "{err}"
        );
        // A containerd configured where another comes first on the PATH.
        exe(&d.join("a/containerd"), "echo 'containerd x 1.6.20'");
        let runc = d.join("a/runc");
        let w = Wanted {
            runc: &runc,
            containerd: &containerd,
            dockerd: &dockerd,
        };
        let err = w.probe().unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Shadowed {
                    key: "containerd",
                    ..
                }
            ),
            "{err}"
        );
    }
}
