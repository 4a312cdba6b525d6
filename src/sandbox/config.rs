//! Sandbox engine configuration: where state lives, which dockerd to run, the
//! uid and address pools, cgroup placement and default limits. Validated as a
//! whole before anything is created.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::images::cache::{self, CacheConfig, CacheConfigError};
use crate::images::registries::{Registries, RegistriesError};

use super::net::ports::{PortRange, PortsError};

/// Size of the uid/gid range every job gets (a full 16-bit id space, as
/// Docker images expect).
pub const RANGE_SIZE: u32 = 65536;

/// The smallest `project_caches.bytes_per_key`: a job's disk with dockerd's
/// own files.
const MIN_KEY_BYTES: u64 = 64 << 20;

/// Default bound on a job's disk: 20 GiB, allocated on the host as the job
/// writes (a sparse image).
pub const DEFAULT_DISK_BYTES: u64 = 20 << 30;

/// Resource limits applied to a whole job (dockerd, containerd and every
/// container it runs) through the host's cgroups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
    /// CPU bandwidth in cores (1.5 = one and a half cores).
    pub cpus: Option<f64>,
    /// Size of the job's own filesystem (its images, containers, volumes,
    /// build cache and temporary files); 0 puts the job's data on the state
    /// dir's filesystem with no bound.
    pub disk_bytes: Option<u64>,
}

impl Limits {
    /// These limits, with every one left out taken from `defaults`.
    pub fn or(&self, defaults: &Limits) -> Limits {
        Limits {
            memory_bytes: self.memory_bytes.or(defaults.memory_bytes),
            pids: self.pids.or(defaults.pids),
            cpus: self.cpus.or(defaults.cpus),
            disk_bytes: self.disk_bytes.or(defaults.disk_bytes),
        }
    }

    /// The job's disk bound, if it has one.
    pub fn disk(&self) -> Option<u64> {
        self.disk_bytes.filter(|b| *b != 0)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(d) = self.disk()
            && d < super::fs::disk::MIN_BYTES
        {
            return Err(ConfigError::Invalid {
                key: "limits.disk_bytes",
                why: format!("{d} is below 64 MiB (67108864); use 0 for no disk bound"),
            });
        }
        if let Some(m) = self.memory_bytes
            && m < 64 << 20
        {
            return Err(ConfigError::Invalid {
                key: "limits.memory_bytes",
                why: format!("{m} is below 64 MiB; dockerd alone needs about 100 MiB"),
            });
        }
        if let Some(p) = self.pids
            && p < 32
        {
            return Err(ConfigError::Invalid {
                key: "limits.pids",
                why: format!("{p} is below 32; dockerd and containerd start dozens of threads"),
            });
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && c >= 0.01)
        {
            return Err(ConfigError::Invalid {
                key: "limits.cpus",
                why: format!("{c} must be a positive number of cores (>= 0.01)"),
            });
        }
        Ok(())
    }
}

/// Where a job's dockerd keeps its images (`[sandbox] image_store`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageStore {
    /// dockerd's own graph driver (overlay2): one platform per image name.
    #[default]
    Classic,
    /// containerd's content store and snapshotter (dockerd's
    /// `containerd-snapshotter` feature): image indexes, multi-platform
    /// builds.
    Containerd,
}

impl ImageStore {
    /// The first dockerd whose `containerd-snapshotter` feature is more
    /// than a preview (24.0).
    pub const CONTAINERD_SINCE: super::engines::Version = super::engines::Version {
        major: 24,
        minor: 0,
        patch: 0,
    };
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Root of berth's state: job records, per-job data-roots, slot claims.
    pub state_dir: PathBuf,
    /// The dockerd binary started in every job.
    pub dockerd: PathBuf,
    /// The containerd that dockerd starts (a file named `containerd`);
    /// empty: the first on the engine's PATH (dockerd's own directory, then
    /// the system's). Set it with `dockerd` to run another engine's pair,
    /// such as Debian 13's unpacked into /opt.
    pub containerd: PathBuf,
    /// The runc containerd's shim runs (a file named `runc`); empty: the
    /// first on the engine's PATH.
    pub runc: PathBuf,
    /// The berth binary used as the job's stage-1 helper and pid 1.
    /// Empty means the running executable.
    pub helper: PathBuf,
    /// First host uid/gid of the pool; job n maps 0..65536 onto
    /// `uid_base + n * 65536`.
    pub uid_base: u32,
    /// Number of 65536-id ranges in the pool (= maximum concurrent jobs).
    pub uid_ranges: u32,
    /// Files whose ranges the pool never overlaps.
    pub subuid_file: PathBuf,
    pub subgid_file: PathBuf,
    /// IPv4 pool for job links, carved into /30s (host end .1, job end .2).
    pub net_pool: Ipv4Addr,
    pub net_pool_prefix: u8,
    /// MTU of job links; 0 means that of the host's default-route interface.
    pub mtu: u32,
    /// Host ports carved into blocks of `ports_per_job`: slot n's block is
    /// where its dockerd allocates the ports containers publish (`-p 80`,
    /// `-P`), and berth forwards it from every address of the agent's host.
    /// Keep it out of the host's `ip_local_port_range` and away from ports
    /// host services listen on; like `net_pool`, distinct per agent.
    pub port_pool: PortRange,
    /// Size of each job's block of published ports; 0 publishes nothing at
    /// the agent's addresses (ports then answer only at the job's own).
    pub ports_per_job: u16,
    /// Resolvers the per-job DNS relay forwards to; empty means the
    /// nameservers of the host's /etc/resolv.conf (loopback ones included).
    pub dns_upstreams: Vec<SocketAddr>,
    /// Where cgroup hierarchies are mounted on the host.
    pub cgroup_root: PathBuf,
    /// Cgroup (relative to each hierarchy's root) under which jobs are placed.
    pub cgroup_parent: String,
    /// procfs of the host (injectable for tests).
    pub proc_root: PathBuf,
    /// Grace given to a job's dockerd to stop its containers at teardown
    /// before everything is killed. 0 (the default): killed at once; a job's
    /// state is thrown away at its end, so a graceful stop protects nothing
    /// unless containers must run their own shutdown (e.g. to flush reports
    /// to a service outside the job).
    #[serde(with = "crate::duration::text")]
    pub stop_grace: Duration,
    /// How often a running job's dockerd is asked `/_ping`; three missed
    /// answers in a row mark the job unhealthy (its clients get a clear
    /// error instead of hanging).
    #[serde(with = "crate::duration::text")]
    pub health_interval: Duration,
    /// How long start waits for the job's `/_ping`.
    #[serde(with = "crate::duration::text")]
    pub ready_timeout: Duration,
    /// Limits for jobs that do not ask for their own.
    pub default_limits: Limits,
    /// Image archives loaded into every new job before it is handed out:
    /// `docker save` tarballs or OCI image layout directories.
    pub preload: Vec<PathBuf>,
    /// Share preloaded images between jobs through read-only idmapped
    /// mounts instead of loading them into every job (falls back to loading
    /// where the kernel cannot).
    pub share_preloads: bool,
    /// Whether jobs run foreign binaries through the host's binfmt_misc
    /// handlers (qemu-user-static's, for arm64 images and builds). On
    /// kernels with an instance per user namespace (6.7 and later) each job
    /// gets its own with copies of the host's enabled handlers; `false`
    /// gives it an empty one. Older kernels apply the host's handlers to
    /// every process, jobs included, and cannot turn them off per job.
    pub host_emulation: bool,
    /// Where each job's dockerd keeps its images: `classic` (its own
    /// graph driver; preloads shared between jobs) or `containerd`
    /// (containerd's content store and snapshotter, dockerd 24 and later),
    /// which multi-platform builds (`buildx build --platform a,b --push`)
    /// and image indexes need. With `containerd` every job loads the
    /// preloads itself.
    pub image_store: ImageStore,
    /// Extra arguments for every job's dockerd (`["--debug"]`). Flags
    /// berth sets itself, and those `daemon.json` or `[registries]` carry,
    /// are refused.
    pub extra_dockerd_args: Vec<String>,
    /// Never read from a configuration file: flags added after berth's own,
    /// unchecked. The benchmark suite opens dockerd's own TLS listener with
    /// them, to measure the front door against it on the same daemon.
    #[serde(skip)]
    pub unchecked_dockerd_args: Vec<String>,
    /// `[registries]` of the configuration file (a section of its own).
    #[serde(skip)]
    pub registries: Registries,
    /// `[cache]` of the configuration file: the shared pull-through cache.
    #[serde(skip)]
    pub cache: CacheConfig,
    /// `[workspaces]` of the configuration file: where jobs may have host
    /// directories bound in.
    #[serde(skip)]
    pub workspaces: super::fs::workspaces::WorkspacesConfig,
    /// `[project_caches]` of the configuration file: warm starts per
    /// project.
    #[serde(skip)]
    pub project_caches: super::fs::caches::ProjectCachesConfig,
}

/// dockerd flags berth sets for every job (or writes to its daemon.json):
/// a second value would break the job or fail its start.
const BERTH_FLAGS: [(&str, &str); 16] = [
    ("--data-root", "the job's data-root is berth's"),
    ("--exec-root", "the job's exec-root is berth's"),
    ("--pidfile", "berth sets it"),
    ("--config-file", "berth writes the job's daemon.json"),
    (
        "--host",
        "the job's API is berth's unix socket; clients come through the front door",
    ),
    (
        "-H",
        "the job's API is berth's unix socket; clients come through the front door",
    ),
    ("--tlsverify", "clients come through berth's front door"),
    ("--mtu", "berth sets the link's MTU (`mtu`)"),
    ("--shutdown-timeout", "berth sets it from `stop_grace`"),
    ("--exec-opt", "berth sets the cgroup driver"),
    ("--rootless", "berth chooses the mode"),
    (
        "--log-driver",
        "daemon.json caps container logs; a container may ask for its own",
    ),
    (
        "--log-opt",
        "daemon.json caps container logs; a container may ask for its own",
    ),
    ("--registry-mirror", "use [registries] mirrors"),
    ("--insecure-registry", "use [registries] insecure"),
    ("--default-network-opt", "berth sets networks' MTU"),
];

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            state_dir: "/var/lib/berth".into(),
            dockerd: "/usr/sbin/dockerd".into(),
            containerd: PathBuf::new(),
            runc: PathBuf::new(),
            helper: PathBuf::new(),
            uid_base: 1_000_000_000,
            uid_ranges: 512,
            subuid_file: "/etc/subuid".into(),
            subgid_file: "/etc/subgid".into(),
            net_pool: Ipv4Addr::new(10, 213, 0, 0),
            net_pool_prefix: 16,
            mtu: 0,
            port_pool: PortRange {
                first: 20000,
                last: 29999,
            },
            ports_per_job: 64,
            dns_upstreams: Vec::new(),
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_parent: "berth".into(),
            proc_root: "/proc".into(),
            stop_grace: Duration::ZERO,
            health_interval: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(30),
            default_limits: Limits {
                memory_bytes: Some(4 << 30),
                pids: Some(4096),
                cpus: None,
                disk_bytes: Some(DEFAULT_DISK_BYTES),
            },
            preload: Vec::new(),
            share_preloads: true,
            host_emulation: true,
            image_store: ImageStore::Classic,
            extra_dockerd_args: Vec::new(),
            unchecked_dockerd_args: Vec::new(),
            registries: Default::default(),
            cache: Default::default(),
            workspaces: Default::default(),
            project_caches: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {key}: {why}")]
    Invalid { key: &'static str, why: String },
    #[error("invalid configuration: {0}")]
    Ports(#[from] PortsError),
    #[error("invalid configuration: {0}")]
    Cache(#[from] CacheConfigError),
    #[error("invalid configuration: {0}")]
    Registries(#[from] RegistriesError),
}

impl SandboxConfig {
    /// The engine parts this configuration names.
    pub fn engine(&self) -> super::engines::Wanted<'_> {
        super::engines::Wanted {
            dockerd: &self.dockerd,
            containerd: &self.containerd,
            runc: &self.runc,
        }
    }

    /// Checks every key; the error names the key and what would be valid.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |key, why: String| Err(ConfigError::Invalid { key, why });
        if !self.state_dir.is_absolute() {
            return inv(
                "state_dir",
                format!("{} must be absolute", self.state_dir.display()),
            );
        }
        // These are private tmpfs mounts inside every job: the job's dockerd
        // could not see its own data-root below them.
        for private in ["/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm"] {
            if self.state_dir.starts_with(private) {
                return inv(
                    "state_dir",
                    format!(
                        "{} is below {private}, which every job replaces with a private tmpfs; \
                         use a directory such as /var/lib/berth",
                        self.state_dir.display()
                    ),
                );
            }
        }
        if self.uid_base == 0 {
            return inv(
                "uid_base",
                "must not be 0: host root is never handed out".into(),
            );
        }
        if self.uid_ranges == 0 {
            return inv("uid_ranges", "must be at least 1".into());
        }
        let end = u64::from(self.uid_base) + u64::from(self.uid_ranges) * u64::from(RANGE_SIZE);
        // 4294967295 is (uid_t)-1, never a valid id.
        if end > u64::from(u32::MAX) {
            return inv(
                "uid_ranges",
                format!(
                    "uid_base {} + {} ranges of {RANGE_SIZE} ends past 4294967294",
                    self.uid_base, self.uid_ranges
                ),
            );
        }
        if !(8..=28).contains(&self.net_pool_prefix) {
            return inv(
                "net_pool_prefix",
                format!("{} must be between 8 and 28", self.net_pool_prefix),
            );
        }
        let mask = u32::MAX << (32 - u32::from(self.net_pool_prefix));
        if u32::from(self.net_pool) & !mask != 0 {
            return inv(
                "net_pool",
                format!(
                    "{}/{} has host bits set",
                    self.net_pool, self.net_pool_prefix
                ),
            );
        }
        if self.mtu != 0 && !(1280..=65535).contains(&self.mtu) {
            return inv(
                "mtu",
                format!("{} must be 0 (auto) or 1280..=65535", self.mtu),
            );
        }
        self.port_pool.check_pool(self.ports_per_job)?;
        if self.cgroup_parent.is_empty()
            || self
                .cgroup_parent
                .split('/')
                .any(|c| c.is_empty() || c == "..")
        {
            return inv(
                "cgroup_parent",
                format!(
                    "{:?} must be a relative path without '..'",
                    self.cgroup_parent
                ),
            );
        }
        if self.stop_grace > Duration::from_secs(600) {
            return inv("stop_grace", "must be at most 10m".into());
        }
        if self.health_interval < Duration::from_millis(100)
            || self.health_interval > Duration::from_secs(3600)
        {
            return inv(
                "health_interval",
                "must be between 0.1 and 3600 seconds".into(),
            );
        }
        if self.ready_timeout < Duration::from_secs(1) {
            return inv("ready_timeout", "must be at least 1 second".into());
        }
        self.default_limits.validate()?;
        for a in &self.extra_dockerd_args {
            let flag = a.split('=').next().unwrap_or_default();
            if let Some((f, why)) = BERTH_FLAGS.iter().find(|(f, _)| *f == flag) {
                return inv("extra_dockerd_args", format!("{f} cannot be given: {why}"));
            }
        }
        let pc = &self.project_caches;
        if pc.enabled && pc.total_bytes < MIN_KEY_BYTES {
            return inv(
                "project_caches.total_bytes",
                format!("{} is below 64 MiB (67108864)", pc.total_bytes),
            );
        }
        if pc.enabled && !(MIN_KEY_BYTES..=pc.total_bytes).contains(&pc.bytes_per_key) {
            return inv(
                "project_caches.bytes_per_key",
                format!(
                    "{} must be between 64 MiB and total_bytes ({})",
                    pc.bytes_per_key, pc.total_bytes
                ),
            );
        }
        self.registries.load()?;
        self.cache.validate()?;
        for root in &self.workspaces.allowed_roots {
            if !root.is_absolute() || !root.is_dir() {
                return inv(
                    "workspaces.allowed_roots",
                    format!("{} is not an absolute path to a directory", root.display()),
                );
            }
        }
        Ok(())
    }

    /// Where the pull-through cache listens, when it is enabled: the host
    /// end of the address pool's last /30 (no job gets that one).
    pub fn cache_addr(&self) -> Option<std::net::SocketAddrV4> {
        self.cache
            .enabled
            .then(|| cache::addr_in_pool(self.net_pool, self.net_pool_prefix))
    }

    /// Number of /30s in the address pool for jobs (the last one is the
    /// cache's, when it is enabled).
    fn nets(&self) -> u64 {
        (1u64 << (32 - u32::from(self.net_pool_prefix) - 2)) - u64::from(self.cache.enabled)
    }

    /// Number of job slots: bounded by the uid pool, the address pool and
    /// the port pool.
    pub fn slots(&self) -> u32 {
        let nets = self.nets();
        let mut n = u64::from(self.uid_ranges).min(nets);
        if self.ports_per_job != 0 {
            n = n.min(u64::from(
                self.port_pool.count() / u32::from(self.ports_per_job),
            ));
        }
        n as u32
    }

    /// Which pool bounds the number of slots, for the error that says all
    /// are in use.
    pub fn slots_bound(&self) -> &'static str {
        let nets = self.nets();
        let slots = u64::from(self.slots());
        if slots == u64::from(self.uid_ranges) {
            "uid_ranges"
        } else if slots == nets {
            "net_pool_prefix"
        } else {
            "port_pool / ports_per_job"
        }
    }

    /// Slot `n`'s block of published ports, if jobs publish any.
    pub fn port_block(&self, slot: u32) -> Option<PortRange> {
        self.port_pool.block(self.ports_per_job, slot)
    }

    /// Host and job addresses of slot `n`'s /30.
    pub fn link_addrs(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let net = u32::from(self.net_pool) + slot * 4;
        (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_cache_bounds_are_checked_when_enabled() {
        let mut c = SandboxConfig::default();
        c.project_caches.total_bytes = 1;
        assert!(c.validate().is_ok(), "off: not checked");
        c.project_caches.enabled = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("project_caches.total_bytes"), "{e}");
        c.project_caches.total_bytes = 10 << 30;
        c.project_caches.bytes_per_key = 20 << 30;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("project_caches.bytes_per_key"), "{e}");
        c.project_caches.bytes_per_key = 5 << 30;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn defaults_are_valid() {
        SandboxConfig::default().validate().unwrap();
    }

    #[test]
    fn rejects_state_dir_below_job_private_mounts() {
        let c = SandboxConfig {
            state_dir: "/tmp/berth".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("state_dir"));
    }

    #[test]
    fn rejects_uid_zero_and_overflow() {
        let c = SandboxConfig {
            uid_base: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("uid_base"));
        let c = SandboxConfig {
            uid_base: u32::MAX - 65536,
            uid_ranges: 2,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("uid_ranges"));
    }

    #[test]
    fn rejects_bad_net_pool_and_parent() {
        let c = SandboxConfig {
            net_pool: Ipv4Addr::new(10, 213, 0, 1),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("net_pool"));
        let c = SandboxConfig {
            cgroup_parent: "../escape".into(),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cgroup_parent")
        );
    }

    #[test]
    fn slots_and_addresses() {
        let c = SandboxConfig {
            net_pool_prefix: 28,
            ..Default::default()
        };
        assert_eq!(c.slots(), 4);
        assert_eq!(
            c.link_addrs(1),
            (Ipv4Addr::new(10, 213, 0, 5), Ipv4Addr::new(10, 213, 0, 6))
        );
    }

    #[test]
    fn port_blocks_are_disjoint_and_bound_the_slots() {
        let c = SandboxConfig {
            port_pool: "20000-20099".parse().unwrap(),
            ports_per_job: 32,
            ..Default::default()
        };
        c.validate().unwrap();
        assert_eq!(c.slots(), 3);
        assert_eq!(c.slots_bound(), "port_pool / ports_per_job");
        assert_eq!(c.port_block(0).unwrap().to_string(), "20000-20031");
        assert_eq!(c.port_block(2).unwrap().to_string(), "20064-20095");
        assert_eq!(c.port_block(3), None);
        let off = SandboxConfig {
            ports_per_job: 0,
            ..Default::default()
        };
        assert_eq!(off.port_block(0), None);
        assert_eq!(off.slots(), 512);
        assert_eq!(SandboxConfig::default().slots(), 156);
    }

    #[test]
    fn port_pool_and_block_size_are_checked() {
        let low = SandboxConfig {
            port_pool: "80-1000".parse().unwrap(),
            ..Default::default()
        };
        assert!(
            low.validate()
                .unwrap_err()
                .to_string()
                .contains("port_pool")
        );
        let few = SandboxConfig {
            ports_per_job: 4,
            ..Default::default()
        };
        assert_eq!(
            few.validate().unwrap_err().to_string(),
            "invalid configuration: ports_per_job: 4 is too few for a job's own connections; \
             use at least 8, or 0 to publish nothing"
        );
    }

    #[test]
    fn extra_dockerd_args_refuse_what_berth_sets() {
        let with = |a: &[&str]| SandboxConfig {
            extra_dockerd_args: a.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        with(&["--debug", "--max-concurrent-downloads", "6"])
            .validate()
            .unwrap();
        for bad in [
            "--data-root=/x",
            "-H",
            "--registry-mirror",
            "--log-opt=max-size=1g",
        ] {
            let e = with(&[bad]).validate().unwrap_err().to_string();
            assert!(e.contains("extra_dockerd_args"), "{bad}: {e}");
        }
    }

    #[test]
    fn limits_validation() {
        let l = Limits {
            memory_bytes: Some(1 << 20),
            ..Default::default()
        };
        assert!(l.validate().is_err());
        let l = Limits {
            cpus: Some(f64::NAN),
            ..Default::default()
        };
        assert!(l.validate().is_err());
        let l = Limits {
            disk_bytes: Some(1 << 20),
            ..Default::default()
        };
        assert!(l.validate().unwrap_err().to_string().contains("disk_bytes"));
        let l = Limits {
            disk_bytes: Some(0),
            ..Default::default()
        };
        l.validate().unwrap();
        assert_eq!(l.disk(), None);
    }

    #[test]
    fn limits_left_out_come_from_the_defaults() {
        let d = SandboxConfig::default().default_limits;
        let asked = Limits {
            memory_bytes: Some(1 << 30),
            ..Default::default()
        };
        let got = asked.or(&d);
        assert_eq!(got.memory_bytes, Some(1 << 30));
        assert_eq!(got.pids, d.pids);
        assert_eq!(got.disk(), Some(DEFAULT_DISK_BYTES));
        assert_eq!(Limits::default().or(&d), d);
    }
}
