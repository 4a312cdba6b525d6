//! `berth doctor`: checks every prerequisite of the agent and prints a
//! pass/fail table with the fix for each failure.

use std::net::SocketAddr;
use std::path::Path;

use crate::frontdoor::ServeConfig;
use crate::sandbox::{ImageStore, SandboxConfig, cgroup, slots};

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about a failure or warning.
    pub fix: String,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Pass,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Fail,
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Warn,
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn version_of(prog: &Path, arg: &str) -> Option<String> {
    let out = std::process::Command::new(prog).arg(arg).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

/// dockerd, containerd and runc with their versions, as a job would run
/// them; the part at fault when the engine cannot run jobs.
fn check_engine(sb: &SandboxConfig) -> Vec<Check> {
    use crate::sandbox::engines::EngineError;
    match sb.engine().probe() {
        Ok(e) => {
            let mut out: Vec<Check> = [
                ("dockerd", &e.dockerd),
                ("containerd", &e.containerd),
                ("runc", &e.runc),
            ]
            .into_iter()
            .map(|(name, part)| pass(name, format!("{} {}", part.release, part.path.display())))
            .collect();
            out.push(check_image_store(sb.image_store, &e.dockerd));
            out
        }
        Err(e) => {
            let fix = match &e {
                EngineError::TooOld { .. } => {
                    "install Debian's docker.io (20.10 or later), or point sandbox.dockerd and \
                     sandbox.containerd at a newer engine (docs/sandbox.md, \"Engines\")"
                }
                _ => {
                    "apt-get install docker.io, or set sandbox.dockerd, sandbox.containerd and sandbox.runc"
                }
            };
            vec![fail(e.key(), e.to_string(), fix)]
        }
    }
}

/// The configured image store against the engine: the containerd store
/// needs dockerd 24 or later; the classic one cannot build or hold images
/// of several platforms at once, which is worth knowing where the engine
/// could.
fn check_image_store(store: ImageStore, dockerd: &crate::sandbox::engines::Part) -> Check {
    let since = ImageStore::CONTAINERD_SINCE;
    match store {
        ImageStore::Containerd if dockerd.version < since => fail(
            "image store",
            format!(
                "image_store = \"containerd\" needs dockerd {since} or later; this is {}",
                dockerd.release
            ),
            "remove image_store from [sandbox], or point sandbox.dockerd and sandbox.containerd \
             at Debian 13's engine (docs/sandbox.md, \"Engines\")",
        ),
        ImageStore::Containerd => pass(
            "image store",
            "containerd: jobs build and push images of several platforms; preloads are loaded \
             into each job",
        ),
        ImageStore::Classic if dockerd.version < since => pass(
            "image store",
            "classic (this dockerd has no containerd image store): one platform per build",
        ),
        ImageStore::Classic => pass(
            "image store",
            "classic: one platform per build; image_store = \"containerd\" in [sandbox] \
             gives jobs multi-platform builds",
        ),
    }
}

/// Runs every check. The cgroup check creates a throwaway job cgroup and
/// removes it again; nothing else is changed on the host.
pub fn run(sb: &SandboxConfig, serve: &ServeConfig) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(if nix::unistd::geteuid().is_root() {
        pass("root", "running as root")
    } else {
        fail(
            "root",
            "not root",
            "run the agent as root (it creates user namespaces, cgroups and links)",
        )
    });

    use crate::sandbox::sys::{AGENT_CAPABILITIES, cap_add_flags, describe_capabilities};
    let missing = crate::sandbox::sys::missing_capabilities(&sb.proc_root);
    out.push(if missing.is_empty() {
        let all = AGENT_CAPABILITIES.map(|(name, _, _)| name);
        pass(
            "capabilities",
            format!("every one the agent uses ({})", all.join(", ")),
        )
    } else {
        fail(
            "capabilities",
            format!("missing: {}", describe_capabilities(&missing)),
            format!(
                "give them to the agent's container: {}",
                cap_add_flags(&missing)
            ),
        )
    });

    let max_userns = std::fs::read_to_string(sb.proc_root.join("sys/user/max_user_namespaces"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    out.push(match max_userns {
        _ if !sb.proc_root.join("self/ns/user").exists() => fail(
            "user namespaces",
            "the kernel has no user namespaces",
            "use a kernel built with CONFIG_USER_NS",
        ),
        Some(0) => fail(
            "user namespaces",
            "user.max_user_namespaces = 0",
            "sysctl -w user.max_user_namespaces=28633",
        ),
        Some(n) => pass("user namespaces", format!("enabled (max {n})")),
        None => warn(
            "user namespaces",
            "max_user_namespaces unreadable",
            "check /proc/sys/user",
        ),
    });

    out.push(match sb.validate() {
        Err(e) => fail(
            "configuration",
            e.to_string(),
            "fix the key named in the message",
        ),
        Ok(()) => pass("configuration", "valid"),
    });

    let claimed = std::fs::read_dir(slots::slots_dir(&sb.state_dir))
        .map(|r| r.count())
        .unwrap_or(0);
    let usable = slots::usable(sb);
    out.push(match &usable {
        Err(e) => fail(
            "uid pool",
            e.to_string(),
            "make /etc/subuid and /etc/subgid readable lines of name:start:count",
        ),
        Ok(usable) => uid_pool(sb, *usable, claimed),
    });
    let usable = usable.unwrap_or(0);

    out.extend(check_engine(sb));
    // Links and addresses go through netlink; only the rules need a tool.
    out.push(match version_of(Path::new("iptables"), "-V") {
        Some(v) => pass("iptables", v),
        None => fail(
            "iptables",
            "`iptables` not found",
            "apt-get install iptables",
        ),
    });

    out.push(check_cgroups(sb));
    out.extend(check_workspaces(sb));
    out.extend(check_project_caches(sb));
    out.extend(check_emulation(sb));
    out.extend(check_capacity(sb, usable as u64, claimed as u64));

    let fwd =
        std::fs::read_to_string(sb.proc_root.join("sys/net/ipv4/ip_forward")).unwrap_or_default();
    out.push(if fwd.trim() == "1" {
        pass("ip forwarding", "enabled")
    } else {
        pass(
            "ip forwarding",
            "off now; the agent turns it on at start (jobs need it for egress)",
        )
    });

    out.push(pass(
        "tun device",
        "not needed: job links are veth pairs in the kernel (no slirp4netns/pasta)",
    ));

    out.push(check_port(serve.listen));
    out.push(check_certs(&serve.certs_dir));
    out
}

/// How many jobs this host carries and what bounds it
/// (`jobs::capacity::bounds`; the agent's descriptors are the running
/// agent's to tell, in `berth capacity`): a warning when the host bounds it
/// below the configured slots. Then the kernel's bounds on what a job does
/// (`jobs::capacity::limits`): inotify and keys, each job's own, and
/// connection tracking, a warning when the host's table is nearly full.
fn check_capacity(sb: &SandboxConfig, usable: u64, claimed: u64) -> Vec<Check> {
    use crate::jobs::{Host, bounds, limits};
    let host = Host {
        fds: None,
        fds_max: None,
        ..Host::read(&sb.proc_root)
    };
    let b = bounds(usable, sb.slots_bound(), claimed, &host);
    let all = b
        .iter()
        .map(|b| format!("{} {}", b.name, b.jobs))
        .collect::<Vec<_>>()
        .join(", ");
    let tight = &b[0];
    let capacity = if tight.name == "slots" || tight.jobs >= usable {
        pass(
            "capacity",
            format!(
                "at most {} jobs, bound by {} ({all})",
                tight.jobs, tight.name
            ),
        )
    } else {
        warn(
            "capacity",
            format!(
                "at most {} jobs, bound by {} ({all}): {}",
                tight.jobs, tight.name, tight.detail
            ),
            match tight.name.as_str() {
                "tasks" => "sysctl -w kernel.pid_max=4194304 (and kernel.threads-max)",
                _ => "give the host more memory, or lower uid_ranges to what it carries",
            },
        )
    };
    let mut out = vec![capacity];
    out.extend(limits(&sb.proc_root).into_iter().map(|l| {
        let name = l.label();
        // A host table nearly full drops new connections, every job's alike.
        match l.in_use {
            Some(used) if used.saturating_mul(5) > l.max.saturating_mul(4) => warn(
                name,
                format!("{used} of {} in use: {}", l.max, l.detail),
                "sysctl -w net.netfilter.nf_conntrack_max=1048576",
            ),
            _ => pass(name, l.detail),
        }
    }));
    out
}

/// Where the project caches' pool is (or will be) and what it needs: a
/// filesystem that shares blocks, or the tools to make and grow an XFS
/// image; room on the disk for `total_bytes`. Nothing is made: the probe
/// copies one small file and removes both.
fn check_project_caches(sb: &SandboxConfig) -> Vec<Check> {
    use crate::sandbox::fs::caches;
    const NAME: &str = "project caches";
    let pc = &sb.project_caches;
    if !pc.enabled {
        return vec![pass(
            NAME,
            "off ([project_caches] enabled = true gives keyed jobs warm starts)",
        )];
    }
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30));
    let dir = sb.state_dir.join("project-caches");
    let image = sb.state_dir.join("project-caches.img");
    // The state dir, or where it will be made.
    let Some(home) = sb.state_dir.ancestors().find(|p| p.is_dir()) else {
        return vec![fail(
            NAME,
            format!("no directory of {} exists", sb.state_dir.display()),
            "give [sandbox] state_dir an absolute path",
        )];
    };
    let mut out = Vec::new();
    let shares = !image.exists() && caches::reflinks(home).is_ok();
    let tools: Vec<&str> = [
        ("mkfs.xfs", "-V"),
        ("xfs_growfs", "-V"),
        ("losetup", "--version"),
    ]
    .into_iter()
    .filter(|(tool, arg)| version_of(Path::new(tool), arg).is_none())
    .map(|(tool, _)| tool)
    .collect();
    out.push(if shares {
        pass(
            NAME,
            format!(
                "the pool is in the state dir ({} shares blocks between files)",
                crate::sandbox::fs::workspaces::fs_name(home)
            ),
        )
    } else if !tools.is_empty() {
        fail(
            NAME,
            format!(
                "{} cannot share blocks, and {} missing to make the pool's XFS image",
                crate::sandbox::fs::workspaces::fs_name(home),
                tools.join(", ")
            ),
            "apt-get install xfsprogs util-linux (or put state_dir on XFS or btrfs)",
        )
    } else if !Path::new("/dev/loop-control").exists() {
        fail(
            NAME,
            "no /dev/loop-control: the pool's XFS image cannot be mounted",
            "modprobe loop",
        )
    } else {
        let size = std::fs::metadata(&image).map(|m| m.len());
        pass(
            NAME,
            match size {
                Ok(b) => format!(
                    "the pool is an XFS image the agent made ({}, {} sparse; it grows as keyed jobs start)",
                    image.display(),
                    gib(b)
                ),
                Err(_) => format!(
                    "{} cannot share blocks: the agent makes an XFS image for the pool ({})",
                    crate::sandbox::fs::workspaces::fs_name(home),
                    image.display()
                ),
            },
        )
    });
    let keys = std::fs::read_dir(dir.join("keys"))
        .map(|r| r.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0);
    // What the disk under the pool can still take, against the keys' bound.
    if let Ok(st) = nix::sys::statvfs::statvfs(home) {
        let free = st.blocks_available() * st.fragment_size();
        // The pool's own XFS: its used blocks are the image's, already
        // out of the disk's free space, and count toward the bound.
        let held = if image.exists() && dir.join("keys").is_dir() {
            nix::sys::statvfs::statvfs(&dir)
                .map(|p| (p.blocks() - p.blocks_free()) * p.fragment_size())
                .unwrap_or(0)
        } else {
            0
        };
        let detail = format!(
            "keys: {keys}; total_bytes {}, bytes_per_key {}; {} free on {}",
            gib(pc.total_bytes),
            gib(pc.bytes_per_key),
            gib(free),
            home.display()
        );
        out.push(if free + held < pc.total_bytes {
            warn(
                "project cache room",
                detail,
                "the disk fills before the keys reach total_bytes: lower total_bytes or free space",
            )
        } else {
            pass("project cache room", detail)
        });
    }
    out
}

/// Each allowed workspace root, with an idmapped mount of it made (and
/// dropped) as a job's start makes one.
fn check_workspaces(sb: &SandboxConfig) -> Vec<Check> {
    use crate::sandbox::fs::workspaces;
    let roots = &sb.workspaces.allowed_roots;
    if roots.is_empty() {
        return vec![pass(
            "workspaces",
            "none allowed ([workspaces] allowed_roots is empty): jobs get no host directories",
        )];
    }
    roots
        .iter()
        .map(|r| match workspaces::probe(r) {
            Ok(()) => pass(
                "workspaces",
                format!(
                    "{}: idmapped mounts work ({}, kernel {})",
                    r.display(),
                    workspaces::fs_name(r),
                    workspaces::kernel()
                ),
            ),
            Err(e) => fail(
                "workspaces",
                e.to_string(),
                "keep workspaces on ext4, xfs or btrfs (Linux 5.12+) or tmpfs (6.3+), \
                 or remove the root from [workspaces] allowed_roots",
            ),
        })
        .collect()
}

/// The host's binfmt_misc handlers for foreign architectures, and whether
/// each job gets an instance of its own.
fn check_emulation(sb: &SandboxConfig) -> Vec<Check> {
    use crate::sandbox::binfmt;
    use crate::sandbox::fs::workspaces::kernel;
    let own = binfmt::own_instances();
    let mut out = vec![match (own, sb.host_emulation) {
        (true, true) => pass(
            "emulation",
            format!(
                "each job gets a binfmt_misc of its own with the host's handlers (kernel {})",
                kernel()
            ),
        ),
        (true, false) => pass(
            "emulation",
            "host_emulation = false: each job gets an empty binfmt_misc of its own",
        ),
        (false, true) => warn(
            "emulation",
            format!(
                "kernel {}: no binfmt_misc per user namespace; jobs run foreign binaries through \
                 the host's handlers and cannot mount binfmt_misc (tonistiigi/binfmt fails in a job)",
                kernel()
            ),
            "Linux 6.7 or later gives each job its own",
        ),
        (false, false) => fail(
            "emulation",
            format!(
                "host_emulation = false needs Linux 6.7 or later; this is {}",
                kernel()
            ),
            "remove host_emulation = false from [sandbox], or run a newer kernel",
        ),
    }];
    if !sb.host_emulation {
        return out;
    }
    let mount = Path::new(binfmt::MOUNT);
    if !mount.join("register").exists() {
        out.push(warn(
            "emulation",
            format!(
                "binfmt_misc is not mounted at {}: jobs run only this host's architecture",
                mount.display()
            ),
            format!(
                "mount -t binfmt_misc binfmt_misc {}, then install emulators (see below)",
                mount.display()
            ),
        ));
        return out;
    }
    let handlers = match binfmt::handlers(mount) {
        Ok(h) => h,
        Err(e) => {
            return vec![fail(
                "emulation",
                e.to_string(),
                "check the host's binfmt_misc",
            )];
        }
    };
    let foreign: Vec<_> = handlers
        .iter()
        .filter(|h| h.enabled && h.arch().is_some())
        .collect();
    if foreign.is_empty() {
        out.push(warn(
            "emulation",
            "no handler for a foreign architecture: jobs run only this host's",
            EMULATORS,
        ));
    }
    for h in foreign {
        let arch = h.arch().unwrap_or_default();
        let from = package_of(&h.interpreter).unwrap_or_else(|| "no package".into());
        let what = format!(
            "{arch}: {} ({}, flags {}, from {from})",
            h.name,
            h.interpreter.display(),
            if h.flags.is_empty() { "none" } else { &h.flags }
        );
        out.push(if h.fixed() {
            pass("emulation", what)
        } else {
            warn(
                "emulation",
                format!("{what}: without the F flag the interpreter must be inside every image"),
                EMULATORS,
            )
        });
    }
    out
}

/// Where Debian's emulators with the F flag come from.
const EMULATORS: &str = "Debian 12: apt-get install qemu-user-static binfmt-support; \
     Debian 13: apt-get install qemu-user-binfmt (static, registered with F by systemd-binfmt)";

/// The Debian package that owns `path` (its links resolved), if any.
fn package_of(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let out = std::process::Command::new("dpkg-query")
        .arg("-S")
        .arg(&real)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    Some(line.split_once(':')?.0.to_string())
}

/// Delegation proven, not assumed: a throwaway job cgroup is created with
/// limits and a process moved into it, exactly as a job start does.
fn check_cgroups(sb: &SandboxConfig) -> Check {
    let mountinfo =
        std::fs::read_to_string(sb.proc_root.join("self/mountinfo")).unwrap_or_default();
    let layout = match cgroup::detect(&mountinfo, &sb.cgroup_root) {
        Ok(l) => l,
        Err(e) => {
            return warn(
                "cgroups",
                format!("{e}: jobs would run dockerd --rootless without limits"),
                "mount cgroup2 (or the v1 hierarchies) read-write at /sys/fs/cgroup",
            );
        }
    };
    let host = cgroup::Host {
        proc_root: &sb.proc_root,
        systemd: cgroup::Host::systemd_booted(),
    };
    match cgroup::prove_delegation(layout, &host, &sb.cgroup_parent) {
        Ok(proof) => pass("cgroups", proof),
        Err(e) => {
            let fix = match &e {
                cgroup::CgroupError::NotDelegated { .. } => {
                    "install deploy/systemd/berth.service (Delegate=yes), or run berth under \
                     `systemd-run --scope -p Delegate=yes`"
                }
                cgroup::CgroupError::Controllers { .. } => {
                    "delegate the cpu, memory and pids controllers to the agent's cgroup \
                     (systemd: Delegate=yes)"
                }
                _ => "give the agent a read-write cgroup filesystem (systemd: Delegate=yes)",
            };
            fail(
                "cgroups",
                format!("{e}: jobs would run dockerd --rootless without limits"),
                fix,
            )
        }
    }
}

fn check_port(addr: SocketAddr) -> Check {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => pass("port", format!("{addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let agent = std::net::TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], addr.port())),
                std::time::Duration::from_secs(1),
            )
            .is_ok();
            warn(
                "port",
                format!(
                    "{addr} is in use{}",
                    if agent {
                        " (an agent may be running)"
                    } else {
                        ""
                    }
                ),
                "stop the other listener or choose --listen",
            )
        }
        Err(e) => fail("port", format!("{addr}: {e}"), "choose another --listen"),
    }
}

fn check_certs(dir: &Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    let ca = dir.join("ca/cert.pem");
    if !ca.exists() {
        return pass(
            "certificates",
            format!(
                "{} has no CA yet: `berth serve` creates one at first start",
                dir.display()
            ),
        );
    }
    for key in ["ca/key.pem", "server/key.pem", "admin/key.pem"] {
        let p = dir.join(key);
        if let Ok(m) = std::fs::metadata(&p)
            && m.permissions().mode() & 0o077 != 0
        {
            return fail(
                "certificates",
                format!(
                    "{} is readable by others (mode {:o})",
                    p.display(),
                    m.permissions().mode() & 0o777
                ),
                format!("chmod 600 {}", p.display()),
            );
        }
    }
    match crate::pki::Ca::load_or_create(dir) {
        Ok(_) => pass(
            "certificates",
            format!("CA in {} loads; keys are 0600", dir.display()),
        ),
        Err(e) => fail(
            "certificates",
            e.to_string(),
            "restore the CA files or move them away to start fresh",
        ),
    }
}

/// When an agent answers on the configured port with the admin bundle in
/// `certs_dir`: how full its warm pool is, and why not. None when no agent
/// runs there (nothing to say).
pub async fn check_running_agent(serve: &ServeConfig) -> Option<Check> {
    let endpoint = format!("localhost:{}", serve.listen.port());
    let client = crate::client::AgentClient::new(&endpoint, &serve.certs_dir).ok()?;
    let pool = match client.pool().await {
        Ok(p) => p,
        Err(crate::client::ClientError::Connect { .. }) => return None,
        Err(e) => {
            return Some(warn(
                "running agent",
                format!("{endpoint}: {e}"),
                "check the agent's log (journalctl -u berth)",
            ));
        }
    };
    let (ready, size) = (pool["ready"].as_u64()?, pool["size"].as_u64()?);
    Some(match pool["last_error"].as_str() {
        Some(e) => warn(
            "warm pool",
            format!(
                "{ready} of {size} ready; {} start(s) failed in a row, next try in {}s: {e}",
                pool["failures"], pool["retry_in_secs"]
            ),
            "fix what the error names; the pool retries by itself",
        ),
        None => pass(
            "warm pool",
            format!("{ready} of {size} ready at {endpoint}"),
        ),
    })
}

/// The table, one check a line, failures with their fix.
pub fn render(checks: &[Check]) -> String {
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(5);
    let mut s = format!("{:<w$}  {:<6}  DETAIL\n", "CHECK", "RESULT");
    for c in checks {
        let r = match c.verdict {
            Verdict::Pass => "ok",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        s.push_str(&format!("{:<w$}  {r:<6}  {}\n", c.name, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("{:<w$}  {:<6}  fix: {}\n", "", "", c.fix));
        }
    }
    s
}

/// The uid pool's check: `usable` ranges, `claimed` of them held.
fn uid_pool(sb: &SandboxConfig, usable: usize, claimed: usize) -> Check {
    if usable == 0 {
        fail(
            "uid pool",
            format!(
                "no usable range in {} ranges from {}",
                sb.uid_ranges, sb.uid_base
            ),
            "move uid_base away from /etc/subuid and /etc/subgid entries, or raise uid_ranges",
        )
    } else if usable <= claimed {
        fail(
            "uid pool",
            format!("all {usable} ranges in use"),
            "raise uid_ranges or end jobs",
        )
    } else {
        pass(
            "uid pool",
            format!(
                "{} of {usable} ranges free (65536 ids each, from {})",
                usable - claimed,
                sb.uid_base
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_containerd_image_store_fails_on_an_engine_without_it() {
        use crate::sandbox::engines::{Part, Version};
        let part = |release: &str| Part {
            path: "/usr/sbin/dockerd".into(),
            version: Version::find(release).unwrap(),
            release: release.into(),
        };
        let old = check_image_store(ImageStore::Containerd, &part("20.10.24+dfsg1"));
        assert_eq!(old.verdict, Verdict::Fail);
        assert!(
            old.detail
                .contains("needs dockerd 24.0.0 or later; this is 20.10.24+dfsg1")
        );
        assert!(old.fix.contains("Debian 13"));
        let new = check_image_store(ImageStore::Containerd, &part("26.1.5+dfsg1"));
        assert_eq!(new.verdict, Verdict::Pass);
        let classic = check_image_store(ImageStore::Classic, &part("26.1.5+dfsg1"));
        assert_eq!(classic.verdict, Verdict::Pass);
        assert!(classic.detail.contains("image_store = \"containerd\""));
    }

    #[test]
    fn a_missing_dockerd_fails_with_its_fix() {
        let sb = SandboxConfig {
            dockerd: "/nonexistent/dockerd".into(),
            ..Default::default()
        };
        let checks = run(&sb, &ServeConfig::default());
        let d = checks.iter().find(|c| c.name == "dockerd").unwrap();
        assert_eq!(d.verdict, Verdict::Fail);
        assert!(d.fix.contains("apt-get install docker.io"));
        let table = render(&checks);
        assert!(
            table.contains("FAIL") && table.contains("fix: apt-get install docker.io"),
            "{table}"
        );
    }
}
