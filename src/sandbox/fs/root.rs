//! The job's private root: what its dockerd, containerd and runc see as
//! `/`. The agent describes it as data ([`plan`]: pure, from facts read
//! once at start and the job's own paths); the job's init carries it out
//! ([`build`]) on a fresh tmpfs and switches to it ([`enter`]), and the
//! host's tree is gone from the job's view.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use super::super::sys::{self, SysError};

/// Where the job's own parts are, as the job sees them. The same in every
/// job, whatever its id or the agent's state dir: nothing of the host's
/// layout shows, and paths dockerd records stay valid in another job.
pub mod inside {
    /// The job's disk: exec-root, HOME, TMPDIR, daemon.json.
    pub const STATE: &str = "/var/lib/berth";
    /// dockerd's data-root (the `data` directory of the job's disk).
    pub const DATA_ROOT: &str = "/var/lib/docker";
    /// Shared image layers, one mount each (never below the data-root:
    /// dockerd binds its data-root onto itself, which would hide them).
    pub const LAYERS: &str = "/var/lib/berth-layers";
    /// The directory of dockerd's API socket, which the agent reaches from
    /// the host side.
    pub const API_DIR: &str = "/run/berth";
    pub const API_SOCKET: &str = "/run/berth/docker.sock";
    /// containerd's configuration and socket where the init starts it
    /// (the socket where dockerd would put its own).
    pub const CONTAINERD_CONFIG: &str = "/var/lib/berth/containerd.toml";
    pub const CONTAINERD_SOCKET: &str = "/var/lib/berth/exec/containerd/containerd.sock";
    /// Where docker:dind's daemon listens, and where tools run in
    /// containers (Testcontainers' reaper, docker:cli, scanners) look for
    /// it: a link to the API socket. `/var/run` is a link to `/run`.
    pub const DIND_SOCKET: &str = "/run/docker.sock";
    /// The group that owns the socket (dockerd's default `--group`), for a
    /// container's non-root user given it with `--group-add`. Hosts'
    /// `docker` groups are system groups; 999 is the common one that
    /// images and setups write as a number.
    pub const DOCKER_GID: u32 = 999;
    /// Where workspaces attached to a running job arrive (from the agent,
    /// by mount propagation) before they are bound at their own paths.
    pub const DROP: &str = "/run/berth-drop";
}

/// Host system directories every job gets read-only, and the top-level
/// links of a merged /usr (recreated as links, not bound).
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// What of the host's /etc a job's tools read: the dynamic linker's cache,
/// the alternatives `iptables` resolves through, the CA bundle, time zone
/// and OS name, protocol and service names. Everything else in the job's
/// /etc is written by berth.
const ETC_CARRIED: &[&str] = &[
    "ld.so.cache",
    "alternatives",
    "ssl/certs",
    "pki",
    "ca-certificates",
    "localtime",
    "os-release",
    "protocols",
    "services",
    "gai.conf",
];

/// The device nodes a job's /dev holds, bound from the host's (a user
/// namespace cannot create device nodes). What dockerd gives a container
/// comes from this /dev, `--privileged` ones included.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// One step of building a job's root. Paths are as the job sees them
/// (`at`) or as its init sees them before the switch (`from`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    Dir {
        at: PathBuf,
    },
    Symlink {
        at: PathBuf,
        to: PathBuf,
    },
    /// A file berth writes (mode 0644).
    File {
        at: PathBuf,
        text: String,
    },
    /// `from` bound at `at`: directories with what is mounted below them
    /// (unless `shallow`), read-only when asked.
    Bind {
        from: PathBuf,
        at: PathBuf,
        dir: bool,
        readonly: bool,
        shallow: bool,
    },
    Tmpfs {
        at: PathBuf,
        mode: u32,
        size: String,
    },
    Proc {
        at: PathBuf,
    },
    Sysfs {
        at: PathBuf,
    },
    Devpts {
        at: PathBuf,
    },
    Mqueue {
        at: PathBuf,
    },
}

/// A host entry a job's root carries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Carried {
    Link(PathBuf),
    Dir,
    File,
}

/// The facts of the host a job's root is made from, read once when the
/// host is prepared.
#[derive(Debug, Clone, Default)]
pub struct HostRoot {
    /// Top-level system entries (`usr`, `bin`, …) and what they are.
    system: Vec<(String, Carried)>,
    /// Entries of /etc carried into every job.
    etc: Vec<(PathBuf, Carried)>,
    /// Directories of the engine's binaries outside the system ones.
    engine_dirs: Vec<PathBuf>,
}

fn carried(p: &Path) -> Option<Carried> {
    let md = std::fs::symlink_metadata(p).ok()?;
    if md.file_type().is_symlink() {
        std::fs::read_link(p).ok().map(Carried::Link)
    } else if md.is_dir() {
        Some(Carried::Dir)
    } else if md.is_file() {
        Some(Carried::File)
    } else {
        None
    }
}

impl HostRoot {
    /// Reads what `/` and `/etc` hold; `engine_path` is dockerd's PATH and
    /// `dockerd` the engine's daemon: their directories outside the system
    /// ones are bound too.
    pub fn read(host: &Path, engine_path: &str, dockerd: &Path) -> HostRoot {
        let system = SYSTEM_DIRS
            .iter()
            .filter_map(|d| carried(&host.join(d)).map(|c| (d.to_string(), c)))
            .collect::<Vec<_>>();
        let etc = ETC_CARRIED
            .iter()
            .filter_map(|e| carried(&host.join("etc").join(e)).map(|c| (PathBuf::from(e), c)))
            .collect();
        let covered = |d: &Path| {
            system
                .iter()
                .any(|(s, _)| d.starts_with(Path::new("/").join(s)))
        };
        let mut engine_dirs: Vec<PathBuf> = Vec::new();
        let dirs = engine_path
            .split(':')
            .map(PathBuf::from)
            .chain(dockerd.parent().map(Path::to_path_buf));
        for d in dirs {
            if d.is_absolute()
                && !covered(&d)
                && host.join(d.strip_prefix("/").unwrap_or(&d)).is_dir()
                && !engine_dirs.iter().any(|e| d.starts_with(e))
            {
                engine_dirs.retain(|e| !e.starts_with(&d));
                engine_dirs.push(d);
            }
        }
        HostRoot {
            system,
            etc,
            engine_dirs,
        }
    }
}

/// A job's own part of its root.
#[derive(Debug, Clone)]
pub struct JobRoot<'a> {
    /// `<state>/jobs/<id>` on the host.
    pub dir: &'a Path,
    pub hostname: &'a str,
    pub job_ip: Ipv4Addr,
    /// The job's DNS relay.
    pub host_ip: Ipv4Addr,
    /// Shared image layers are mounted below `<dir>/layers`.
    pub layers: bool,
    /// The host's cgroup tree, read-only: runc's rootless fallback must
    /// find (and skip) the hierarchies it cannot write.
    pub host_cgroups: bool,
    /// Workspaces: where the stage-1 helper attached each one's idmapped
    /// mount, and the path the job sees it at.
    pub workspaces: &'a [(PathBuf, PathBuf)],
}

/// The steps that make a job's root, in order (mounts below a path come
/// after the mount at it).
pub fn plan(host: &HostRoot, job: &JobRoot<'_>) -> Vec<Step> {
    let p = PathBuf::from;
    let mut s = Vec::new();
    let bind = |from: PathBuf, at: PathBuf, dir: bool, readonly: bool| Step::Bind {
        from,
        at,
        dir,
        readonly,
        shallow: false,
    };
    for (name, what) in &host.system {
        let at = Path::new("/").join(name);
        s.push(match what {
            Carried::Link(to) => Step::Symlink { at, to: to.clone() },
            Carried::Dir | Carried::File => bind(at.clone(), at, true, true),
        });
    }
    for d in &host.engine_dirs {
        s.push(bind(d.clone(), d.clone(), true, true));
    }
    // containerd's `opt` plugin makes /opt/containerd at every start: in
    // the job's own /opt, empty of anything of the host's.
    for d in ["/etc", "/var", "/opt"] {
        s.push(Step::Dir { at: p(d) });
    }
    s.push(Step::Symlink {
        at: p("/var/run"),
        to: p("../run"),
    });
    for (rel, what) in &host.etc {
        let (from, at) = (Path::new("/etc").join(rel), Path::new("/etc").join(rel));
        s.push(match what {
            Carried::Link(to) => Step::Symlink { at, to: to.clone() },
            Carried::Dir => bind(from, at, true, true),
            Carried::File => bind(from, at, false, true),
        });
    }
    for (name, text) in etc_files(job) {
        s.push(Step::File {
            at: Path::new("/etc").join(name),
            text,
        });
    }
    s.push(Step::Proc { at: p("/proc") });
    s.push(Step::Sysfs { at: p("/sys") });
    if job.host_cgroups {
        s.push(bind(p("/sys/fs/cgroup"), p("/sys/fs/cgroup"), true, true));
    }
    s.push(Step::Tmpfs {
        at: p("/dev"),
        mode: 0o755,
        size: "64k".into(),
    });
    for d in DEVICES {
        let dev = Path::new("/dev").join(d);
        s.push(bind(dev.clone(), dev, false, false));
    }
    s.push(Step::Devpts { at: p("/dev/pts") });
    s.push(Step::Symlink {
        at: p("/dev/ptmx"),
        to: p("pts/ptmx"),
    });
    for (name, fd) in [
        ("fd", ""),
        ("stdin", "/0"),
        ("stdout", "/1"),
        ("stderr", "/2"),
    ] {
        s.push(Step::Symlink {
            at: Path::new("/dev").join(name),
            to: PathBuf::from(format!("/proc/self/fd{fd}")),
        });
    }
    s.push(Step::Mqueue {
        at: p("/dev/mqueue"),
    });
    for (at, mode, size) in [
        ("/dev/shm", 0o1777, "64m"),
        ("/run", 0o755, "64m"),
        ("/tmp", 0o1777, "512m"),
        ("/var/tmp", 0o1777, "512m"),
    ] {
        s.push(Step::Tmpfs {
            at: p(at),
            mode,
            size: size.into(),
        });
    }
    s.push(Step::Dir { at: p("/run/lock") });
    let root = job.dir.join("root");
    s.push(bind(root.clone(), p(inside::STATE), true, false));
    s.push(bind(root.join("data"), p(inside::DATA_ROOT), true, false));
    s.push(bind(root.join("etc-docker"), p("/etc/docker"), true, false));
    if job.layers {
        s.push(bind(job.dir.join("layers"), p(inside::LAYERS), true, true));
    }
    s.push(bind(job.dir.join("api"), p(inside::API_DIR), true, false));
    // Relative: it leads to the job's socket wherever the job's root is
    // seen from (`-v /:/host` in a container).
    s.push(Step::Symlink {
        at: p(inside::DIND_SOCKET),
        to: p("berth/docker.sock"),
    });
    // Not recursive, not read-only: a bind of the drop point that stays its
    // slave (a recursive or remounted copy would too, but needs nothing of
    // either).
    s.push(Step::Bind {
        from: job.dir.join("drop"),
        at: p(inside::DROP),
        dir: true,
        readonly: false,
        shallow: true,
    });
    for (from, at) in job.workspaces {
        s.push(Step::Bind {
            from: from.clone(),
            at: at.clone(),
            dir: true,
            readonly: false,
            shallow: true,
        });
    }
    s
}

/// The files of a job's /etc that berth writes.
fn etc_files(job: &JobRoot<'_>) -> Vec<(&'static str, String)> {
    vec![
        ("hostname", format!("{}\n", job.hostname)),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
                job.job_ip, job.hostname
            ),
        ),
        ("resolv.conf", format!("nameserver {}\n", job.host_ip)),
        (
            "passwd",
            "root:x:0:0:root:/root:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                .into(),
        ),
        (
            "group",
            format!(
                "root:x:0:\ndocker:x:{}:\nnogroup:x:65534:\n",
                inside::DOCKER_GID
            ),
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
             networks: files\nprotocols: files\nservices: files\n"
                .into(),
        ),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("building the job's root, at {at}: {source}")]
    Sys { at: PathBuf, source: SysError },
    #[error("building the job's root, at {at}: {source}")]
    Io { at: PathBuf, source: std::io::Error },
}

/// `at` (as the job sees it) below the new root `new`.
fn under(new: &Path, at: &Path) -> PathBuf {
    new.join(at.strip_prefix("/").unwrap_or(at))
}

/// Carries out `steps` below `new`, a directory the caller (the job's init,
/// root of the job's user and mount namespaces) mounts a fresh tmpfs on.
pub fn build(new: &Path, steps: &[Step]) -> Result<(), RootError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let hard = nosuid_nodev | MsFlags::MS_NOEXEC;
    let sys_err = |at: &Path| {
        let at = at.to_path_buf();
        move |source| RootError::Sys { at, source }
    };
    let io_err = |at: &Path| {
        let at = at.to_path_buf();
        move |source| RootError::Io { at, source }
    };
    sys::mount(
        "tmpfs",
        new,
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=755,size=64m"),
    )
    .map_err(sys_err(Path::new("/")))?;
    for step in steps {
        match step {
            Step::Dir { at } => {
                std::fs::create_dir_all(under(new, at)).map_err(io_err(at))?;
            }
            Step::Symlink { at, to } => {
                let path = under(new, at);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err(at))?;
                }
                std::os::unix::fs::symlink(to, &path).map_err(io_err(at))?;
            }
            Step::File { at, text } => {
                let path = under(new, at);
                std::fs::write(&path, text).map_err(io_err(at))?;
            }
            Step::Bind {
                from,
                at,
                dir,
                readonly,
                shallow,
            } => {
                let path = under(new, at);
                if *dir {
                    std::fs::create_dir_all(&path).map_err(io_err(at))?;
                } else {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(io_err(at))?;
                    }
                    std::fs::File::create(&path).map_err(io_err(at))?;
                }
                let mut flags = MsFlags::MS_BIND;
                if !shallow {
                    flags |= MsFlags::MS_REC;
                }
                sys::mount(&from.to_string_lossy(), &path, None, flags, None)
                    .map_err(sys_err(at))?;
                if *readonly {
                    sys::remount_readonly(&path).map_err(sys_err(at))?;
                }
            }
            Step::Tmpfs { at, mode, size } => {
                let path = under(new, at);
                std::fs::create_dir_all(&path).map_err(io_err(at))?;
                let data = format!("mode={mode:o},size={size}");
                sys::mount("tmpfs", &path, Some("tmpfs"), nosuid_nodev, Some(&data))
                    .map_err(sys_err(at))?;
            }
            Step::Proc { at } | Step::Sysfs { at } | Step::Mqueue { at } => {
                let fstype = match step {
                    Step::Proc { .. } => "proc",
                    Step::Sysfs { .. } => "sysfs",
                    _ => "mqueue",
                };
                let path = under(new, at);
                std::fs::create_dir_all(&path).map_err(io_err(at))?;
                sys::mount(fstype, &path, Some(fstype), hard, None).map_err(sys_err(at))?;
            }
            Step::Devpts { at } => {
                let path = under(new, at);
                std::fs::create_dir_all(&path).map_err(io_err(at))?;
                sys::mount(
                    "devpts",
                    &path,
                    Some("devpts"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                    Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
                )
                .map_err(sys_err(at))?;
            }
        }
    }
    Ok(())
}

/// Makes `new` the job's `/`; the host's tree is detached.
pub fn enter(new: &Path) -> Result<(), RootError> {
    sys::pivot_into(new).map_err(|source| RootError::Sys {
        at: new.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostRoot {
        HostRoot {
            system: vec![
                ("usr".into(), Carried::Dir),
                ("bin".into(), Carried::Link("usr/bin".into())),
            ],
            etc: vec![
                ("ld.so.cache".into(), Carried::File),
                ("ssl/certs".into(), Carried::Dir),
                (
                    "localtime".into(),
                    Carried::Link("/usr/share/zoneinfo/UTC".into()),
                ),
            ],
            engine_dirs: vec!["/opt/engine/usr/sbin".into()],
        }
    }

    fn job<'a>(ws: &'a [(PathBuf, PathBuf)]) -> JobRoot<'a> {
        JobRoot {
            dir: Path::new("/var/lib/berth-state/jobs/0123456789ab"),
            hostname: "berth-0123456789ab",
            job_ip: Ipv4Addr::new(10, 1, 0, 2),
            host_ip: Ipv4Addr::new(10, 1, 0, 1),
            layers: false,
            host_cgroups: false,
            workspaces: ws,
        }
    }

    fn binds(steps: &[Step]) -> Vec<(String, String, bool)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind {
                    from, at, readonly, ..
                } => Some((
                    from.display().to_string(),
                    at.display().to_string(),
                    *readonly,
                )),
                _ => None,
            })
            .collect()
    }

    /// Everything of the host a job's root holds is on this list: system
    /// directories and carried /etc entries read-only, device nodes, and
    /// the job's own directories at fixed paths.
    #[test]
    fn a_jobs_root_binds_only_system_parts_devices_and_its_own_directories() {
        let ws = [(
            PathBuf::from("/j/workspaces/0"),
            PathBuf::from("/srv/ci/ws/app"),
        )];
        let steps = plan(&host(), &job(&ws));
        let d = "/var/lib/berth-state/jobs/0123456789ab";
        let mut want: Vec<(String, String, bool)> = vec![
            ("/usr".into(), "/usr".into(), true),
            (
                "/opt/engine/usr/sbin".into(),
                "/opt/engine/usr/sbin".into(),
                true,
            ),
            ("/etc/ld.so.cache".into(), "/etc/ld.so.cache".into(), true),
            ("/etc/ssl/certs".into(), "/etc/ssl/certs".into(), true),
        ];
        for dev in DEVICES {
            want.push((format!("/dev/{dev}"), format!("/dev/{dev}"), false));
        }
        want.extend([
            (format!("{d}/root"), inside::STATE.into(), false),
            (format!("{d}/root/data"), inside::DATA_ROOT.into(), false),
            (format!("{d}/root/etc-docker"), "/etc/docker".into(), false),
            (format!("{d}/api"), inside::API_DIR.into(), false),
            (format!("{d}/drop"), inside::DROP.into(), false),
            ("/j/workspaces/0".into(), "/srv/ci/ws/app".into(), false),
        ]);
        assert_eq!(binds(&steps), want);
        assert!(steps.contains(&Step::Symlink {
            at: "/bin".into(),
            to: "usr/bin".into()
        }));
        // A workspace never brings what is mounted below it on the host.
        assert!(steps.iter().any(|s| matches!(s,
            Step::Bind { at, shallow: true, .. } if at == Path::new("/srv/ci/ws/app"))));
    }

    #[test]
    fn the_jobs_etc_names_its_relay_and_itself() {
        let steps = plan(&host(), &job(&[]));
        let file = |name: &str| {
            steps.iter().find_map(|s| match s {
                Step::File { at, text } if at == &Path::new("/etc").join(name) => {
                    Some(text.clone())
                }
                _ => None,
            })
        };
        assert_eq!(file("resolv.conf").unwrap(), "nameserver 10.1.0.1\n");
        assert!(
            file("hosts")
                .unwrap()
                .contains("10.1.0.2\tberth-0123456789ab\n")
        );
        assert!(file("passwd").unwrap().starts_with("root:x:0:0:"));
        assert!(file("group").unwrap().contains("\ndocker:x:999:\n"));
    }

    /// docker:dind's socket path leads to the job's own daemon, and the
    /// link is made after the mounts of /run it points into.
    #[test]
    fn docker_sock_is_a_link_to_the_jobs_own_api_socket() {
        let steps = plan(&host(), &job(&[]));
        let link = steps
            .iter()
            .position(|s| {
                *s == Step::Symlink {
                    at: inside::DIND_SOCKET.into(),
                    to: "berth/docker.sock".into(),
                }
            })
            .expect("no /run/docker.sock");
        let mounted = |at: &str| {
            steps.iter().position(|s| {
                matches!(s, Step::Tmpfs { at: a, .. } | Step::Bind { at: a, .. } if a == Path::new(at))
            })
        };
        assert!(mounted("/run").unwrap() < link);
        assert!(mounted(inside::API_DIR).unwrap() < link);
        assert_eq!(
            Path::new("/run").join("berth/docker.sock"),
            Path::new(inside::API_SOCKET)
        );
        assert!(steps.contains(&Step::Symlink {
            at: "/var/run".into(),
            to: "../run".into()
        }));
    }

    /// A mount's parent exists before it: nothing below /run, /dev or the
    /// job's state is mounted before them.
    #[test]
    fn mounts_come_after_the_mounts_they_sit_in() {
        let ws = [(PathBuf::from("/j/workspaces/0"), PathBuf::from("/run/ws"))];
        let steps = plan(
            &host(),
            &JobRoot {
                layers: true,
                host_cgroups: true,
                ..job(&ws)
            },
        );
        let pos = |p: &str| {
            steps
                .iter()
                .position(|s| match s {
                    Step::Tmpfs { at, .. } | Step::Bind { at, .. } | Step::Sysfs { at } => {
                        at == Path::new(p)
                    }
                    _ => false,
                })
                .unwrap_or_else(|| panic!("{p} is not mounted"))
        };
        assert!(pos("/run") < pos(inside::API_DIR));
        assert!(pos("/run") < pos("/run/ws"));
        assert!(pos("/sys") < pos("/sys/fs/cgroup"));
        assert!(pos("/dev") < pos("/dev/null"));
    }

    #[test]
    fn engine_directories_outside_the_system_ones_are_bound_once() {
        let host_dir = std::env::temp_dir().join(format!("berth-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&host_dir);
        for d in ["usr/bin", "opt/e/usr/sbin", "opt/e/usr/bin"] {
            std::fs::create_dir_all(host_dir.join(d)).unwrap();
        }
        let h = HostRoot::read(
            &host_dir,
            "/opt/e/usr/sbin:/opt/e/usr/bin:/usr/bin:/missing",
            Path::new("/opt/e/usr/sbin/dockerd"),
        );
        assert_eq!(
            h.engine_dirs,
            vec![PathBuf::from("/opt/e/usr/sbin"), "/opt/e/usr/bin".into()]
        );
        assert_eq!(h.system, vec![("usr".to_string(), Carried::Dir)]);
        std::fs::remove_dir_all(&host_dir).unwrap();
    }
}
