//! Host side of a job's network: a veth pair (host end `bh<id>`, job end moved
//! into the job's network namespace), forwarding, NAT, and filter rules. Every
//! rule berth adds lives in its own chains (BERTH-*) and carries the comment
//! `berth-job-<id>`, so teardown and recovery find exactly the job's rules.
//!
//! A job may open connections to the outside (NATed), and to its DNS relay on
//! the host end of its link; nothing else on the host and no other job. From
//! outside, only its block of published ports reaches it: a connection to
//! any address of the agent's host (loopback included) on a port of the
//! block is forwarded to the job's address, where only what the job
//! publishes answers.
//!
//! Below: `rtnl` (the netlink requests for links, addresses and routes),
//! `dns` (each job's relay to the host's resolvers) and `ports` (the block of
//! published ports).

pub(super) mod dns;
pub mod ports;
pub(super) mod rtnl;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;

use nix::errno::Errno;

use ports::PortRange;
use rtnl::{LinkChange, Rtnl, RtnlError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run {cmd}: {source} (install iptables)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("cannot write {path}: {source}")]
    Forwarding {
        path: String,
        source: std::io::Error,
    },
    /// A netlink request about a link (or its address) failed; `errno`
    /// says why, where the kernel refused.
    #[error("cannot {op} {link}: {source}")]
    Link {
        op: &'static str,
        link: String,
        source: RtnlError,
    },
}

impl NetError {
    /// The kernel's errno, where it refused a netlink request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetError::Link { source, .. } => source.errno(),
            _ => None,
        }
    }
}

/// Maps a failed netlink request about `link` to a [`NetError`].
fn link_err(op: &'static str, link: &str) -> impl FnOnce(RtnlError) -> NetError + use<> {
    let link = link.to_string();
    move |source| NetError::Link { op, link, source }
}

const FILTER_CHAINS: [(&str, &str); 2] = [("INPUT", "BERTH-INPUT"), ("FORWARD", "BERTH-FORWARD")];
const NAT_CHAINS: [(&str, &str); 3] = [
    ("PREROUTING", "BERTH-PREROUTING"),
    ("OUTPUT", "BERTH-OUTPUT"),
    ("POSTROUTING", "BERTH-POSTROUTING"),
];

/// The addresses of one job's link, and the host ports forwarded to it.
#[derive(Debug, Clone, Copy)]
pub struct JobAddrs {
    pub host_ip: Ipv4Addr,
    pub job_ip: Ipv4Addr,
    pub ports: Option<PortRange>,
    /// The agent's pull-through cache, which the job may reach.
    pub cache: Option<SocketAddrV4>,
}

pub fn host_ifname(job_id: &str) -> String {
    format!("bh{}", &job_id[..job_id.len().min(12)])
}

pub fn peer_ifname(job_id: &str) -> String {
    format!("bj{}", &job_id[..job_id.len().min(12)])
}

pub fn comment(job_id: &str) -> String {
    format!("berth-job-{job_id}")
}

fn run(prog: &str, args: &[&str]) -> Result<String, NetError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// MTU of the interface carrying the host's IPv4 default route (1500 when
/// there is none).
pub fn default_route_mtu() -> u32 {
    let mtu = || -> Result<Option<u32>, RtnlError> {
        let mut nl = Rtnl::open()?;
        match nl.default_route_link()? {
            Some(index) => nl.link_mtu(index).map(Some),
            None => Ok(None),
        }
    };
    match mtu() {
        Ok(m) => m.unwrap_or(1500),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the default route's MTU; jobs get 1500");
            1500
        }
    }
}

pub fn enable_forwarding(proc_root: &Path) -> Result<(), NetError> {
    let p = proc_root.join("sys/net/ipv4/ip_forward");
    if std::fs::read_to_string(&p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(&p, "1").map_err(|source| NetError::Forwarding {
        path: p.display().to_string(),
        source,
    })
}

/// Creates the pair with the host end addressed and up, and the job's end
/// in the network namespace of `job_pid` (here without one). With
/// `publish`, connections from the host's loopback may be forwarded over
/// it (`route_localnet`; their source is rewritten to the host end).
///
/// The job's end is made where it belongs rather than moved there: a move
/// waits for the kernel's pending RCU callbacks (`rcu_barrier`), tens of
/// milliseconds of a job's start.
pub fn create_link(
    job_id: &str,
    host_ip: Ipv4Addr,
    mtu: u32,
    publish: bool,
    job_pid: Option<u32>,
) -> Result<(), NetError> {
    let (h, p) = (host_ifname(job_id), peer_ifname(job_id));
    let mut nl = Rtnl::open().map_err(link_err("open a netlink socket for", &h))?;
    nl.add_veth(&h, &p, mtu, job_pid)
        .map_err(link_err("create the veth pair", &format!("{h}/{p}")))?;
    // The filter rules are IPv4: the host end must not speak IPv6 at all, or
    // a job could reach host services listening on `::` over link-local.
    // A link whose MTU is below IPv6's minimum (1280) has no IPv6 at all,
    // nor this file.
    let v6 = format!("/proc/sys/net/ipv6/conf/{h}/disable_ipv6");
    match std::fs::write(&v6, "1") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(NetError::Forwarding {
                path: v6,
                source: e,
            });
        }
        _ => {}
    }
    if publish {
        let p = format!("/proc/sys/net/ipv4/conf/{h}/route_localnet");
        std::fs::write(&p, "1").map_err(|source| NetError::Forwarding { path: p, source })?;
    }
    let index = nl.link_index(&h).map_err(link_err("look up", &h))?;
    nl.add_address(index, host_ip, 30, false)
        .map_err(link_err("address", &h))?;
    nl.set_link(
        index,
        LinkChange {
            up: true,
            ..Default::default()
        },
    )
    .map_err(link_err("bring up", &h))
}

/// Deletes the pair (both ends go). Idempotent: the kernel also removes the
/// pair on its own when the job's network namespace goes, which may happen
/// at any time before or during the delete; a link that is not there
/// (ENODEV) is gone, not a failure.
pub fn delete_link(job_id: &str) -> Result<(), NetError> {
    let (h, p) = (host_ifname(job_id), peer_ifname(job_id));
    let mut nl = Rtnl::open().map_err(link_err("open a netlink socket for", &h))?;
    // The job's end is here only when the job never got it.
    for name in [h, p] {
        match nl.delete_link(&name) {
            Err(e) if e.errno() != Some(Errno::ENODEV) => return Err(link_err("delete", &name)(e)),
            _ => {}
        }
    }
    Ok(())
}

fn ensure_chains() -> Result<(), NetError> {
    for (table, chains) in [("filter", &FILTER_CHAINS[..]), ("nat", &NAT_CHAINS[..])] {
        for (builtin, ours) in chains {
            if run("iptables", &["-w", "-t", table, "-n", "-L", ours]).is_err() {
                // Another agent may create it between the check and here.
                let _ = run("iptables", &["-w", "-t", table, "-N", ours]);
            }
            if run("iptables", &["-w", "-t", table, "-C", builtin, "-j", ours]).is_err() {
                run(
                    "iptables",
                    &["-w", "-t", table, "-I", builtin, "1", "-j", ours],
                )?;
            }
        }
    }
    Ok(())
}

/// The rules of one job, as `iptables` argument lists (table, chain, spec).
pub fn job_rules(job_id: &str, a: &JobAddrs) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let (host_ip, job_ip) = (a.host_ip, a.job_ip);
    let h = host_ifname(job_id);
    let c = comment(job_id);
    let net = format!("{}/30", Ipv4Addr::from(u32::from(job_ip) & !3));
    let s = |v: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        out.extend(["-m", "comment", "--comment", &c].map(String::from));
        out
    };
    let hip = host_ip.to_string();
    let mut rules = vec![
        // The job's DNS relay answers on the host end of the link.
        (
            "filter",
            "BERTH-INPUT",
            s(&[
                "-i", &h, "-d", &hip, "-p", "udp", "--dport", "53", "-j", "ACCEPT",
            ]),
        ),
        (
            "filter",
            "BERTH-INPUT",
            s(&[
                "-i", &h, "-d", &hip, "-p", "tcp", "--dport", "53", "-j", "ACCEPT",
            ]),
        ),
        // Replies to connections the host opened (a published port of the job).
        (
            "filter",
            "BERTH-INPUT",
            s(&[
                "-i",
                &h,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
        ),
    ];
    if let Some(c) = a.cache {
        // The agent's pull-through cache, on an address of its own.
        rules.push((
            "filter",
            "BERTH-INPUT",
            s(&[
                "-i",
                &h,
                "-d",
                &c.ip().to_string(),
                "-p",
                "tcp",
                "--dport",
                &c.port().to_string(),
                "-j",
                "ACCEPT",
            ]),
        ));
    }
    rules.extend([
        // Nothing else on the host: no host service, whatever it listens on.
        ("filter", "BERTH-INPUT", s(&["-i", &h, "-j", "DROP"])),
        // No job reaches another job.
        (
            "filter",
            "BERTH-FORWARD",
            s(&["-i", &h, "-o", "bh+", "-j", "DROP"]),
        ),
        (
            "filter",
            "BERTH-FORWARD",
            s(&["-i", &h, "-s", &net, "-j", "ACCEPT"]),
        ),
        ("filter", "BERTH-FORWARD", s(&["-i", &h, "-j", "DROP"])),
        // Replies come back; from outside, only connections forwarded to
        // the job's published ports (below) open a connection in.
        (
            "filter",
            "BERTH-FORWARD",
            s(&[
                "-o",
                &h,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
        ),
    ]);
    if let Some(block) = a.ports {
        let ports = format!("{}:{}", block.first, block.last);
        let jip = job_ip.to_string();
        for proto in ["tcp", "udp"] {
            // Forwarded to the job from any address of the host, for
            // clients on the host (OUTPUT) and elsewhere (PREROUTING)...
            for chain in ["BERTH-PREROUTING", "BERTH-OUTPUT"] {
                rules.push((
                    "nat",
                    chain,
                    s(&[
                        "-p",
                        proto,
                        "-m",
                        "addrtype",
                        "--dst-type",
                        "LOCAL",
                        "--dport",
                        &ports,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &jip,
                    ]),
                ));
            }
            // ...and let through, unless it comes from a job: another job's
            // ports are never reachable, whichever started first.
            rules.push((
                "filter",
                "BERTH-FORWARD",
                s(&[
                    "!",
                    "-i",
                    "bh+",
                    "-o",
                    &h,
                    "-d",
                    &jip,
                    "-p",
                    proto,
                    "--dport",
                    &ports,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "DNAT",
                    "-j",
                    "ACCEPT",
                ]),
            ));
        }
        // A client on the host's loopback reaches the job as the host end of
        // the link: the job cannot answer 127.0.0.1.
        rules.push((
            "nat",
            "BERTH-POSTROUTING",
            s(&["-o", &h, "-s", "127.0.0.0/8", "-j", "MASQUERADE"]),
        ));
    }
    rules.push(("filter", "BERTH-FORWARD", s(&["-o", &h, "-j", "DROP"])));
    rules.push((
        "nat",
        "BERTH-POSTROUTING",
        s(&["-s", &net, "!", "-o", &h, "-j", "MASQUERADE"]),
    ));
    rules
}

/// Adds every rule of the job in one `iptables-restore` batch, after
/// checks that berth's chains are in place and jumped to. Where they are not
/// (the first job since boot, or someone flushed the tables), whatever part
/// of the batch landed is taken back, the chains are made, and the batch
/// runs once more.
pub fn add_rules(job_id: &str, addrs: &JobAddrs) -> Result<(), NetError> {
    add_batch(&comment(job_id), &appended(&job_rules(job_id, addrs)))
}

/// `lines` (table, command) in one batch; see [`add_rules`]. `tag` names
/// the rules taken back when the chains were missing.
fn add_batch(tag: &str, lines: &[(&str, String)]) -> Result<(), NetError> {
    let script = add_script(lines);
    if restore(&script).is_ok() {
        return Ok(());
    }
    delete_tagged(tag)?;
    ensure_chains()?;
    restore(&script)
}

/// Rules as `-A` commands, in order.
fn appended(rules: &[(&'static str, &'static str, Vec<String>)]) -> Vec<(&'static str, String)> {
    rules
        .iter()
        .map(|(table, chain, spec)| (*table, format!("-A {chain} {}", spec.join(" "))))
        .collect()
}

/// The batch that adds `lines`: per table, first a check of each jump into
/// berth's chains (a missing one fails the batch before anything of that
/// table is added), then the commands in order.
fn add_script(lines: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (table, chains) in [("filter", &FILTER_CHAINS[..]), ("nat", &NAT_CHAINS[..])] {
        out.push_str(&format!("*{table}\n"));
        for (builtin, ours) in chains {
            out.push_str(&format!("-C {builtin} -j {ours}\n"));
        }
        for (_, line) in lines.iter().filter(|(t, _)| *t == table) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The batch that deletes `lines` (table, `-A` line as `iptables-save`
/// prints it).
fn delete_script(lines: &[(String, String)]) -> String {
    let mut out = String::new();
    for table in ["filter", "nat"] {
        let mine: Vec<&str> = lines
            .iter()
            .filter(|(t, _)| t == table)
            .filter_map(|(_, l)| l.strip_prefix("-A "))
            .collect();
        if mine.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for rule in mine {
            out.push_str(&format!("-D {rule}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Runs one `iptables-restore` batch that leaves every other rule alone.
fn restore(script: &str) -> Result<(), NetError> {
    use std::io::Write;
    let cmd = "iptables-restore -w --noflush".to_string();
    let spawn = |source| NetError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(spawn)?;
    written.map_err(spawn)?;
    if !out.status.success() {
        return Err(NetError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Rules (table, `-A` line) tagged with `job_id`'s comment, in every berth
/// chain, read with one `iptables-save`.
pub fn rules_of(job_id: &str) -> Result<Vec<(String, String)>, NetError> {
    rules_tagged(&comment(job_id))
}

fn rules_tagged(tag: &str) -> Result<Vec<(String, String)>, NetError> {
    Ok(tagged_rules(&run("iptables-save", &[])?, tag))
}

/// The `-A` lines of berth's chains in an `iptables-save` text that carry
/// the comment `tag`, with their table.
fn tagged_rules(save: &str, tag: &str) -> Vec<(String, String)> {
    let ours = |chain: &str| {
        FILTER_CHAINS
            .iter()
            .chain(NAT_CHAINS.iter())
            .any(|(_, c)| *c == chain)
    };
    let mut table = "";
    let mut out = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            continue;
        }
        let mut words = line.split_whitespace();
        if words.next() != Some("-A") || !words.next().is_some_and(ours) {
            continue;
        }
        if words.any(|w| w.trim_matches('"') == tag) {
            out.push((table.to_string(), line.to_string()));
        }
    }
    out
}

/// Deletes every rule of the job in one batch. Idempotent: where another
/// teardown of the same job removed some rules between the read and the
/// batch, it reads again.
pub fn delete_rules(job_id: &str) -> Result<(), NetError> {
    delete_tagged(&comment(job_id))
}

fn delete_tagged(tag: &str) -> Result<(), NetError> {
    let mut tries = 0;
    loop {
        let lines = rules_tagged(tag)?;
        if lines.is_empty() {
            return Ok(());
        }
        match restore(&delete_script(&lines)) {
            Ok(()) => return Ok(()),
            Err(_) if tries < 2 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

fn cache_tag(addr: SocketAddrV4) -> String {
    format!("berth-cache-{}", addr.ip())
}

/// The pull-through cache's address, on the host's loopback, and the rules
/// that keep it to the host and to jobs: from any other interface it is
/// dropped, and each job's own rules let it in from its link alone.
pub fn add_cache(addr: SocketAddrV4) -> Result<(), NetError> {
    let tag = cache_tag(addr);
    delete_tagged(&tag)?;
    let mut nl = Rtnl::open().map_err(link_err("open a netlink socket for", "lo"))?;
    let lo = nl.link_index("lo").map_err(link_err("look up", "lo"))?;
    nl.add_address(lo, *addr.ip(), 32, true)
        .map_err(link_err("add the cache's address to", "lo"))?;
    let ip = addr.ip().to_string();
    let c = format!("-m comment --comment {tag}");
    // Inserted at the top, in reverse: the host's own connections first.
    add_batch(
        &tag,
        &[
            (
                "filter",
                format!("-I BERTH-INPUT 1 -d {ip} ! -i bh+ -j DROP {c}"),
            ),
            (
                "filter",
                format!("-I BERTH-INPUT 1 -i lo -d {ip} -j ACCEPT {c}"),
            ),
        ],
    )
}

/// Takes the cache's address and rules away. Idempotent: an address that is
/// not there (EADDRNOTAVAIL) is gone.
pub fn remove_cache(addr: SocketAddrV4) -> Result<(), NetError> {
    delete_tagged(&cache_tag(addr))?;
    let mut nl = Rtnl::open().map_err(link_err("open a netlink socket for", "lo"))?;
    let lo = nl.link_index("lo").map_err(link_err("look up", "lo"))?;
    match nl.delete_address(lo, *addr.ip(), 32) {
        Err(e) if e.errno() != Some(Errno::EADDRNOTAVAIL) => {
            Err(link_err("remove the cache's address from", "lo")(e))
        }
        _ => Ok(()),
    }
}

/// Nameservers of a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse().ok())
        })
        .collect()
}

#[cfg(test)]
pub(in crate::sandbox) mod tests {
    use super::*;

    /// A job's link with a block of published ports and no cache.
    fn addrs() -> JobAddrs {
        JobAddrs {
            host_ip: Ipv4Addr::new(10, 0, 0, 1),
            job_ip: Ipv4Addr::new(10, 0, 0, 2),
            ports: Some(PortRange {
                first: 20000,
                last: 20063,
            }),
            cache: None,
        }
    }

    /// Runs `f` on a thread of its own in a network namespace of its own
    /// (netns is per thread; links made there never touch the host's, and
    /// go with it). Needs root; fails naming it, unless the privileged tests
    /// are opted out of.
    pub(in crate::sandbox) fn in_private_netns<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if std::env::var_os("BERTH_SKIP_PRIVILEGED_TESTS").is_some() {
            eprintln!("BERTH_SKIP_PRIVILEGED_TESTS is set: privileged test not run");
            return None;
        }
        let t = std::thread::spawn(move || {
            crate::sandbox::sys::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect(
                "a network namespace of the test's own: run as root \
                 (or set BERTH_SKIP_PRIVILEGED_TESTS=1 to opt out explicitly)",
            );
            f()
        });
        Some(t.join().unwrap())
    }

    fn read(path: String) -> String {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_string()
    }

    #[test]
    fn a_link_is_made_addressed_and_up_and_its_delete_is_idempotent() {
        in_private_netns(|| {
            let id = "0123456789abcdef";
            let (h, p) = (host_ifname(id), peer_ifname(id));
            let host_ip = Ipv4Addr::new(10, 9, 9, 1);
            create_link(id, host_ip, 1400, true, None).unwrap();
            let mut nl = Rtnl::open().unwrap();
            let hi = nl.link_index(&h).unwrap();
            let pi = nl.link_index(&p).unwrap();
            assert_eq!(nl.link_mtu(hi).unwrap(), 1400);
            assert_eq!(nl.link_mtu(pi).unwrap(), 1400, "both ends");
            let link = nl.link(hi).unwrap();
            assert!(
                link.header
                    .flags
                    .contains(netlink_packet_route::link::LinkFlags::Up),
                "{:?}",
                link.header.flags
            );
            assert_eq!(nl.addresses(hi).unwrap(), [(host_ip, 30)]);
            assert_eq!(
                nl.addresses(pi).unwrap(),
                [],
                "the job addresses its own end"
            );
            assert_eq!(
                read(format!("/proc/sys/net/ipv6/conf/{h}/disable_ipv6")),
                "1"
            );
            assert_eq!(
                read(format!("/proc/sys/net/ipv4/conf/{h}/route_localnet")),
                "1"
            );

            // A second pair of the same names is refused, by its errno.
            let again = create_link(id, host_ip, 1400, false, None).unwrap_err();
            assert_eq!(again.errno(), Some(Errno::EEXIST), "{again}");
            assert!(again.to_string().contains(&h), "names the link: {again}");

            delete_link(id).unwrap();
            for name in [&h, &p] {
                let e = nl.link_index(name).unwrap_err();
                assert_eq!(e.errno(), Some(Errno::ENODEV), "{name}: {e}");
            }
            // Gone already (as when the job's namespace took it): Ok.
            delete_link(id).unwrap();
            // A peer never handed to a job goes with the pair too. (A link
            // below IPv6's minimum MTU has no IPv6 to turn off.)
            create_link(id, host_ip, 1200, false, None).unwrap();
            delete_link(id).unwrap();
            assert_eq!(nl.link_index(&p).unwrap_err().errno(), Some(Errno::ENODEV));

            // Without a default route, the MTU jobs get is 1500.
            assert_eq!(default_route_mtu(), 1500);
        });
    }

    #[test]
    fn names_fit_ifnamsiz() {
        let id = "0123456789abcdef0123";
        assert!(host_ifname(id).len() <= 15);
        assert!(peer_ifname(id).len() <= 15);
        assert_ne!(host_ifname(id), peer_ifname(id));
    }

    #[test]
    fn every_rule_is_tagged_and_in_our_chains() {
        let r = job_rules("abc", &addrs());
        for (_, chain, spec) in &r {
            assert!(chain.starts_with("BERTH-"));
            assert!(
                spec.windows(2)
                    .any(|w| w[0] == "--comment" && w[1] == "berth-job-abc")
            );
        }
        // Masquerade covers exactly the job's /30.
        assert!(
            r.iter()
                .any(|(t, _, s)| *t == "nat" && s.contains(&"10.0.0.0/30".to_string()))
        );
    }

    #[test]
    fn published_ports_are_let_in_before_the_drop_and_never_from_a_job() {
        let a = addrs();
        let r = job_rules("abc", &a);
        let forward: Vec<&Vec<String>> = r
            .iter()
            .filter(|(_, c, _)| *c == "BERTH-FORWARD")
            .map(|(_, _, s)| s)
            .collect();
        let drop_in = forward
            .iter()
            .position(|s| s[..4] == ["-o", "bhabc", "-j", "DROP"])
            .unwrap();
        let accepts: Vec<usize> = forward
            .iter()
            .enumerate()
            .filter(|(_, s)| s.contains(&"DNAT".to_string()))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(accepts.len(), 2);
        for i in accepts {
            assert!(i < drop_in);
            assert_eq!(forward[i][..3], ["!", "-i", "bh+"]);
            assert!(forward[i].contains(&"20000:20063".to_string()));
        }
        let dnat = r
            .iter()
            .filter(|(t, _, s)| *t == "nat" && s.contains(&"--to-destination".to_string()))
            .count();
        assert_eq!(dnat, 4, "tcp and udp, from the host and from elsewhere");
        // The cache, where there is one, is let in from the job's link
        // before everything else on the host is dropped.
        let with_cache = job_rules(
            "abc",
            &JobAddrs {
                cache: Some("10.0.255.253:5000".parse().unwrap()),
                ..a
            },
        );
        let input: Vec<&Vec<String>> = with_cache
            .iter()
            .filter(|(_, c, _)| *c == "BERTH-INPUT")
            .map(|(_, _, s)| s)
            .collect();
        let to_cache = input
            .iter()
            .position(|s| s.contains(&"10.0.255.253".to_string()))
            .expect("a rule for the cache");
        assert_eq!(
            input[to_cache][..10],
            [
                "-i",
                "bhabc",
                "-d",
                "10.0.255.253",
                "-p",
                "tcp",
                "--dport",
                "5000",
                "-j",
                "ACCEPT"
            ]
        );
        let drop_all = input
            .iter()
            .position(|s| s[..4] == ["-i", "bhabc", "-j", "DROP"])
            .unwrap();
        assert!(to_cache < drop_all);
        assert!(
            !r.iter()
                .any(|(_, _, s)| s.contains(&"10.0.255.253".to_string()))
        );
        // Without a block, nothing is forwarded in.
        let none = job_rules("abc", &JobAddrs { ports: None, ..a });
        assert!(!none.iter().any(|(_, _, s)| s.contains(&"DNAT".to_string())));
    }

    #[test]
    fn one_batch_checks_the_jumps_before_adding_and_deletes_what_save_printed() {
        let a = addrs();
        let rules = job_rules("abc", &a);
        let script = add_script(&appended(&rules));
        let lines: Vec<&str> = script.lines().collect();
        // Per table: the header, every jump checked, then every rule, COMMIT.
        let nat = lines.iter().position(|l| *l == "*nat").unwrap();
        assert_eq!(lines[0], "*filter");
        assert_eq!(lines[1], "-C INPUT -j BERTH-INPUT");
        assert_eq!(lines[2], "-C FORWARD -j BERTH-FORWARD");
        assert_eq!(lines[nat - 1], "COMMIT");
        assert_eq!(
            lines[nat + 1..nat + 4],
            [
                "-C PREROUTING -j BERTH-PREROUTING",
                "-C OUTPUT -j BERTH-OUTPUT",
                "-C POSTROUTING -j BERTH-POSTROUTING"
            ]
        );
        let added = lines.iter().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(added, rules.len());
        // Rules keep their order within a table (the drops come last).
        let filter: Vec<&&str> = lines[..nat]
            .iter()
            .filter(|l| l.starts_with("-A "))
            .collect();
        assert!(
            filter
                .last()
                .unwrap()
                .ends_with("-j DROP -m comment --comment berth-job-abc")
        );

        // What iptables-save prints of that job (quoted or not), beside
        // another job's rules and the builtin chains' jumps.
        let save = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n\
            -A INPUT -j BERTH-INPUT\n\
            -A BERTH-INPUT -i bhabc -j DROP -m comment --comment berth-job-abc\n\
            -A BERTH-INPUT -i bhabcd -j DROP -m comment --comment berth-job-abcd\n\
            -A DOCKER -i bhabc -m comment --comment berth-job-abc -j DROP\nCOMMIT\n\
            *nat\n-A BERTH-POSTROUTING -s 10.0.0.0/30 ! -o bhabc -m comment --comment \"berth-job-abc\" -j MASQUERADE\nCOMMIT\n";
        let mine = tagged_rules(save, &comment("abc"));
        assert_eq!(mine.len(), 2, "{mine:?}");
        assert_eq!(
            delete_script(&mine),
            "*filter\n-D BERTH-INPUT -i bhabc -j DROP -m comment --comment berth-job-abc\nCOMMIT\n\
             *nat\n-D BERTH-POSTROUTING -s 10.0.0.0/30 ! -o bhabc -m comment --comment \"berth-job-abc\" -j MASQUERADE\nCOMMIT\n"
        );
        assert_eq!(delete_script(&[]), "");
    }

    #[test]
    fn parses_nameservers() {
        let ns = nameservers("# x\nnameserver 127.0.0.53\nsearch a\nnameserver fe80::1%eth0\n");
        assert_eq!(ns.len(), 2);
        assert!(ns[0].is_loopback());
    }
}
