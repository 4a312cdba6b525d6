//! Which identity may send which request, and what a job's request may ask
//! for: pure functions of the request head (and, for the few requests the
//! `strict` profile reads, its JSON body), no I/O. A job certificate opens
//! its own job's Docker API and nothing of the agent's; the admin
//! certificate opens the job API only. The user namespace stays the
//! boundary; the optional profile is defence in depth: `allow-all` (the
//! default) lets a job ask its daemon for anything, `strict` denies
//! privileged containers, the host's namespaces, bind mounts outside an
//! allow-list, devices, added capabilities beyond a list, unconfined
//! seccomp or AppArmor, and images from registries not listed.

use std::borrow::Cow;
use std::path::{Component, Path, PathBuf};

use hyper::header::{CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use hyper::{HeaderMap, Method, StatusCode};
use serde::{Deserialize, Serialize};

/// "/v1.41/containers/json" → "/containers/json".
pub fn strip_version(path: &str) -> &str {
    if let Some(rest) = path.strip_prefix("/v")
        && let Some(i) = rest.find('/')
        && rest[..i].chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        return &rest[i..];
    }
    path
}

pub const API_PREFIX: &str = "/berth/";

/// Why a request is not let through: the rule that denied it, the status
/// the client gets and a message the docker CLI prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rule: &'static str,
    pub status: StatusCode,
    pub message: Cow<'static, str>,
}

/// Proof that a request was decided and let through. Only this module makes
/// one, and the proxy forwards nothing without it.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct Permit(());

pub type Decision = Result<Permit, Denial>;

fn allow() -> Decision {
    Ok(Permit(()))
}

/// A request from the admin identity.
pub fn decide_admin(_method: &Method, path: &str) -> Decision {
    if path == "/berth/v1/jobs"
        || path.starts_with("/berth/v1/jobs/")
        || path == "/berth/v1/pool"
        || path == "/berth/v1/capacity"
        || path == "/berth/v1/metrics"
        || path == "/berth/v1/caches"
    {
        return allow();
    }
    if path.starts_with(API_PREFIX) {
        return Err(Denial {
            rule: "admin-unknown-path",
            status: StatusCode::NOT_FOUND,
            message: "berth: no such job API path (see /berth/v1/jobs)".into(),
        });
    }
    Err(Denial {
        rule: "admin-opens-no-daemon",
        status: StatusCode::FORBIDDEN,
        message: "berth: the admin certificate opens the job API only; use a job's certificate for its Docker API".into(),
    })
}

/// `[policy]` in berth.toml: what a job's requests may ask of its daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub profile: Profile,
    /// `strict`: host paths (as the job sees them) that containers may bind
    /// mount, with everything below them.
    pub allowed_bind_sources: Vec<PathBuf>,
    /// `strict`: capabilities a container may add (`--cap-add`), without
    /// the `CAP_` prefix.
    pub allowed_capabilities: Vec<String>,
    /// `strict`: registries images may come from (`docker.io` for Docker
    /// Hub names); empty: any.
    pub allowed_registries: Vec<String>,
    /// `strict`: bodies read to decide (container create, exec create) are
    /// read up to this; a larger one is denied.
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    #[default]
    AllowAll,
    Strict,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            profile: Profile::AllowAll,
            allowed_bind_sources: Vec::new(),
            allowed_capabilities: Vec::new(),
            allowed_registries: Vec::new(),
            max_body_bytes: 1 << 20,
        }
    }
}

/// Docker's capability names (without `CAP_`), as `--cap-add` takes them.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The path a local-driver volume binds: its `device` when its options
/// (`-o`) say `bind` or `rbind`.
fn volume_bind(opts: &serde_json::Value) -> Option<String> {
    let binds = opts["o"]
        .as_str()?
        .split(',')
        .any(|o| matches!(o.trim(), "bind" | "rbind"));
    binds.then(|| opts["device"].as_str().map(str::to_string))?
}

fn cap_name(c: &str) -> String {
    let c = c.trim().to_ascii_uppercase();
    c.strip_prefix("CAP_").map(str::to_string).unwrap_or(c)
}

impl Policy {
    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for p in &self.allowed_bind_sources {
            if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err((
                    "policy.allowed_bind_sources",
                    format!("{} must be an absolute path without ..", p.display()),
                ));
            }
        }
        for c in &self.allowed_capabilities {
            if !CAPABILITIES.contains(&cap_name(c).as_str()) {
                return Err((
                    "policy.allowed_capabilities",
                    format!("{c:?} is not a Linux capability (NET_ADMIN, SYS_PTRACE, …)"),
                ));
            }
        }
        if !(4096..=64 << 20).contains(&self.max_body_bytes) {
            return Err((
                "policy.max_body_bytes",
                "must be between 4096 and 67108864".into(),
            ));
        }
        Ok(())
    }

    /// Whether deciding `method path` needs its body.
    pub fn needs_body(&self, method: &Method, path: &str) -> bool {
        if self.profile != Profile::Strict || method != Method::POST {
            return false;
        }
        let seg: Vec<&str> = strip_version(path).trim_matches('/').split('/').collect();
        matches!(
            seg.as_slice(),
            ["containers", "create"] | ["containers", _, "exec"] | ["volumes", "create"]
        )
    }

    /// The profile's decision on a job's request; `body` is there when
    /// [`Policy::needs_body`] asked for it.
    /// A job certificate opens its own job's Docker API, never the job API.
    pub fn decide(
        &self,
        method: &Method,
        uri: &hyper::Uri,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Decision {
        let path = strip_version(uri.path());
        if uri.path().starts_with(API_PREFIX) || path.starts_with(API_PREFIX) {
            return Err(Denial {
                rule: "job-api-needs-admin",
                status: StatusCode::FORBIDDEN,
                message: "berth: the job API needs the admin certificate".into(),
            });
        }
        if method == Method::POST && matches!(path, "/session" | "/grpc") {
            buildkit_upgrade(path, headers)?;
        }
        if self.profile == Profile::AllowAll {
            return allow();
        }
        let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
        let query = |key: &str| -> Option<String> {
            url_query(uri.query().unwrap_or(""))
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
        };
        match (method, seg.as_slice()) {
            (&Method::POST, ["containers", "create"]) => match parse(body) {
                Ok(v) => self.container(&v),
                Err(d) => Err(d),
            },
            (&Method::POST, ["containers", _, "exec"]) => match parse(body) {
                Ok(v) if v["Privileged"].as_bool() == Some(true) => deny(
                    "privileged",
                    "privileged exec (`docker exec --privileged`) is not allowed",
                ),
                Ok(_) => allow(),
                Err(d) => Err(d),
            },
            // The local driver's `-o bind` volumes are bind mounts by
            // another name.
            (&Method::POST, ["volumes", "create"]) => match parse(body) {
                Ok(v) => self.binds_allowed(volume_bind(&v["DriverOpts"])),
                Err(d) => Err(d),
            },
            (&Method::POST, ["images", "create"]) => match query("fromImage") {
                Some(image) => self.registry_of(&image),
                None => allow(),
            },
            (&Method::POST, ["build"]) => {
                if query("networkmode").is_some_and(|m| m == "host") {
                    return deny(
                        "host-network",
                        "builds on the host's network (`--network host`) are not allowed",
                    );
                }
                allow()
            }
            // Plugins run with whatever privileges they ask for.
            (&Method::POST, ["plugins", "pull"]) => {
                deny("plugins", "installing daemon plugins is not allowed")
            }
            _ => allow(),
        }
    }

    fn container(&self, v: &serde_json::Value) -> Decision {
        let hc = &v["HostConfig"];
        if hc["Privileged"].as_bool() == Some(true) {
            return deny(
                "privileged",
                "privileged containers (`--privileged`) are not allowed",
            );
        }
        for (key, flag, rule) in [
            ("PidMode", "--pid", "host-pid"),
            ("IpcMode", "--ipc", "host-ipc"),
            ("UTSMode", "--uts", "host-uts"),
            ("UsernsMode", "--userns", "host-userns"),
            ("NetworkMode", "--network", "host-network"),
        ] {
            if hc[key].as_str() == Some("host") {
                return deny(
                    rule,
                    format!("the host's namespaces (`{flag} host`) are not allowed"),
                );
            }
        }
        let binds = hc["Binds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                let src = b.as_str()?.split(':').next()?;
                src.starts_with('/').then(|| src.to_string())
            });
        let mounts = hc["Mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m["Type"].as_str() {
                Some("bind") => m["Source"].as_str().map(str::to_string),
                Some("volume") => volume_bind(&m["VolumeOptions"]["DriverConfig"]["Options"]),
                _ => None,
            });
        let Permit(()) = self.binds_allowed(binds.chain(mounts))?;
        let any = |key: &str| hc[key].as_array().is_some_and(|a| !a.is_empty());
        if any("Devices") || any("DeviceRequests") || any("DeviceCgroupRules") {
            return deny(
                "devices",
                "host devices (`--device`, `--gpus`) are not allowed",
            );
        }
        for c in hc["CapAdd"].as_array().into_iter().flatten() {
            let name = cap_name(c.as_str().unwrap_or_default());
            let allowed = self
                .allowed_capabilities
                .iter()
                .any(|a| cap_name(a) == name);
            if !allowed {
                return deny(
                    "cap-add",
                    format!("adding the capability {name} (`--cap-add`) is not allowed"),
                );
            }
        }
        for o in hc["SecurityOpt"].as_array().into_iter().flatten() {
            let o = o.as_str().unwrap_or_default().replace(':', "=");
            if matches!(
                o.as_str(),
                "seccomp=unconfined"
                    | "apparmor=unconfined"
                    | "systempaths=unconfined"
                    | "label=disable"
            ) {
                return deny("unconfined", format!("`--security-opt {o}` is not allowed"));
            }
        }
        match v["Image"].as_str() {
            Some(image) => self.registry_of(image),
            None => allow(),
        }
    }

    /// Every source of `binds` must be allowed (docker:dind's socket in a
    /// job among them: through it a container would ask the daemon for what
    /// this profile denies, past the front door).
    fn binds_allowed(&self, binds: impl IntoIterator<Item = String>) -> Decision {
        for src in binds {
            if !self.bind_allowed(Path::new(&src)) {
                return deny(
                    "bind-mount",
                    format!(
                        "bind mounts of {src} are not allowed (policy.allowed_bind_sources); use a volume"
                    ),
                );
            }
        }
        allow()
    }

    /// A path is allowed when it is, or is below, an allowed source; `..`
    /// never climbs out of one.
    fn bind_allowed(&self, src: &Path) -> bool {
        let mut clean = PathBuf::from("/");
        for c in src.components() {
            match c {
                Component::Normal(n) => clean.push(n),
                Component::ParentDir => {
                    clean.pop();
                }
                _ => {}
            }
        }
        self.allowed_bind_sources
            .iter()
            .any(|a| clean.starts_with(a))
    }

    fn registry_of(&self, image: &str) -> Decision {
        if self.allowed_registries.is_empty() {
            return allow();
        }
        let r = registry(image);
        if self.allowed_registries.iter().any(|a| a == r) {
            return allow();
        }
        deny(
            "registry",
            format!("images from {r} are not allowed (policy.allowed_registries)"),
        )
    }
}

/// The registry an image reference names: its first component when that
/// looks like a host (a dot, a port, or `localhost`), else Docker Hub.
pub fn registry(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// BuildKit's `/session` and `/grpc` are HTTP/2 over an upgraded connection
/// (`Upgrade: h2c`), and a session names itself. Anything else sent there
/// is the client's mistake: a body would make the bytes after the head
/// ambiguous (request or stream?), and a nameless session collides with
/// every other nameless one in the daemon.
fn buildkit_upgrade(path: &str, headers: &HeaderMap) -> Result<(), Denial> {
    let malformed = |what: &str| Denial {
        rule: "malformed-upgrade",
        status: StatusCode::BAD_REQUEST,
        message: format!("berth: {path} is BuildKit's HTTP/2 endpoint: {what}").into(),
    };
    let h2c = headers
        .get_all(UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"));
    if !h2c {
        return Err(malformed("the request must ask for `Upgrade: h2c`"));
    }
    let body = headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if body {
        return Err(malformed("an upgrade request carries no body"));
    }
    let named = headers
        .get("x-docker-expose-session-uuid")
        .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
    if path == "/session" && !named {
        return Err(malformed(
            "a session names itself (X-Docker-Expose-Session-Uuid)",
        ));
    }
    Ok(())
}

fn deny(rule: &'static str, what: impl Into<String>) -> Decision {
    Err(Denial {
        rule,
        status: StatusCode::FORBIDDEN,
        message: format!(
            "berth: denied by this agent's policy (strict, rule {rule}): {}",
            what.into()
        )
        .into(),
    })
}

fn parse(body: Option<&[u8]>) -> Result<serde_json::Value, Denial> {
    let body = body.unwrap_or_default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| Denial {
        rule: "unreadable-body",
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "berth: denied by this agent's policy (strict, rule unreadable-body): the request body is not JSON: {e}"
        )
        .into(),
    })
}

/// `a=1&b=x%2Fy` → [("a", "1"), ("b", "x/y")].
fn url_query(q: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the docker CLI sends to open a BuildKit session.
    fn session_head() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(UPGRADE, "h2c".parse().unwrap());
        h.insert(hyper::header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert("X-Docker-Expose-Session-Uuid", "k3x9".parse().unwrap());
        h
    }

    fn job(m: &Method, p: &str) -> Decision {
        // Both profiles: the job API is closed to jobs whatever the profile.
        let uri: hyper::Uri = p.parse().unwrap();
        let h = session_head();
        let strict = strict().decide(m, &uri, &h, None);
        assert_eq!(
            strict.is_ok(),
            Policy::default().decide(m, &uri, &h, None).is_ok()
        );
        strict
    }

    #[test]
    fn a_malformed_buildkit_upgrade_is_the_clients_400_in_every_profile() {
        let post = |p: &str, h: &HeaderMap| {
            let uri: hyper::Uri = p.parse().unwrap();
            let d = Policy::default().decide(&Method::POST, &uri, h, None);
            assert_eq!(
                d,
                strict()
                    .decide(&Method::POST, &uri, h, None)
                    .map(|_| Permit(()))
            );
            d
        };
        assert!(post("/session", &session_head()).is_ok());
        assert!(post("/v1.41/session", &session_head()).is_ok());
        let mut grpc = session_head();
        grpc.remove("X-Docker-Expose-Session-Uuid");
        assert!(post("/grpc", &grpc).is_ok(), "/grpc names no session");
        let mut cases: Vec<(&str, HeaderMap, &str)> = Vec::new();
        let mut h = session_head();
        h.remove(UPGRADE);
        cases.push(("/session", h, "Upgrade: h2c"));
        let mut h = session_head();
        h.insert(UPGRADE, "websocket".parse().unwrap());
        cases.push(("/grpc", h, "Upgrade: h2c"));
        let mut h = session_head();
        h.insert(CONTENT_LENGTH, "5".parse().unwrap());
        cases.push(("/session", h, "no body"));
        let mut h = session_head();
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        cases.push(("/v1.44/grpc", h, "no body"));
        let mut h = session_head();
        h.insert("X-Docker-Expose-Session-Uuid", " ".parse().unwrap());
        cases.push(("/session", h, "names itself"));
        for (p, h, why) in cases {
            let d = post(p, &h).unwrap_err();
            assert_eq!(d.status, StatusCode::BAD_REQUEST, "{p}");
            assert_eq!(d.rule, "malformed-upgrade");
            assert!(d.message.contains(why), "{p}: {}", d.message);
        }
        // Other methods go on to dockerd, which answers them itself.
        let uri: hyper::Uri = "/session".parse().unwrap();
        assert!(
            Policy::default()
                .decide(&Method::GET, &uri, &HeaderMap::new(), None)
                .is_ok()
        );
    }

    #[test]
    fn jobs_reach_every_docker_path_but_not_the_job_api() {
        for m in [
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PUT,
            Method::HEAD,
        ] {
            for p in [
                "/_ping",
                "/v1.41/containers/json",
                "/images/x/get",
                "/exec/1/start",
                "/session",
            ] {
                assert!(job(&m, p).is_ok(), "{m} {p}");
            }
            for p in ["/berth/v1/jobs", "/v1.41/berth/v1/jobs", "/berth/"] {
                assert!(
                    matches!(
                        job(&m, p),
                        Err(Denial {
                            rule: "job-api-needs-admin",
                            ..
                        })
                    ),
                    "{m} {p}"
                );
            }
        }
    }

    #[test]
    fn admin_reaches_the_job_api_only() {
        assert!(decide_admin(&Method::POST, "/berth/v1/jobs").is_ok());
        assert!(decide_admin(&Method::DELETE, "/berth/v1/jobs/0123456789ab").is_ok());
        for p in [
            "/_ping",
            "/v1.41/containers/json",
            "/berth/v2/x",
            "/berth/v1/jobsx",
        ] {
            assert!(decide_admin(&Method::GET, p).is_err(), "{p}");
        }
    }

    fn strict() -> Policy {
        Policy {
            profile: Profile::Strict,
            allowed_bind_sources: vec!["/srv/cache".into()],
            allowed_capabilities: vec!["NET_ADMIN".into()],
            allowed_registries: vec!["docker.io".into(), "registry.example:5000".into()],
            ..Policy::default()
        }
    }

    fn create(body: serde_json::Value) -> Decision {
        let uri: hyper::Uri = "/v1.41/containers/create?name=x".parse().unwrap();
        strict().decide(
            &Method::POST,
            &uri,
            &HeaderMap::new(),
            Some(body.to_string().as_bytes()),
        )
    }

    fn rule(d: Decision) -> &'static str {
        match d {
            Err(Denial {
                rule,
                status,
                message,
            }) => {
                assert!(message.contains(rule), "{message}");
                assert!(status.is_client_error());
                rule
            }
            Ok(Permit(())) => "allow",
        }
    }

    #[test]
    fn strict_denies_what_reaches_past_the_container() {
        use serde_json::json;
        let p = strict();
        assert!(p.needs_body(&Method::POST, "/v1.41/containers/create"));
        assert!(p.needs_body(&Method::POST, "/containers/abc/exec"));
        assert!(!p.needs_body(&Method::GET, "/containers/json"));
        assert!(!Policy::default().needs_body(&Method::POST, "/containers/create"));
        let ok = json!({"Image": "busybox", "HostConfig": {"Binds": ["data:/data", "/srv/cache/go:/go"], "CapAdd": ["net_admin"], "NetworkMode": "bridge"}});
        assert_eq!(rule(create(ok)), "allow");
        for (hc, want) in [
            (json!({"Privileged": true}), "privileged"),
            (json!({"PidMode": "host"}), "host-pid"),
            (json!({"IpcMode": "host"}), "host-ipc"),
            (json!({"UTSMode": "host"}), "host-uts"),
            (json!({"UsernsMode": "host"}), "host-userns"),
            (json!({"NetworkMode": "host"}), "host-network"),
            (json!({"Binds": ["/:/host"]}), "bind-mount"),
            (
                json!({"Binds": ["/srv/cache/../../etc:/x:ro"]}),
                "bind-mount",
            ),
            (
                json!({"Mounts": [{"Type": "bind", "Source": "/var/run", "Target": "/r"}]}),
                "bind-mount",
            ),
            // docker:dind's socket in the job: the daemon past the policy.
            (
                json!({"Binds": ["/var/run/docker.sock:/var/run/docker.sock"]}),
                "bind-mount",
            ),
            (
                json!({"Mounts": [{"Type": "volume", "Target": "/r", "VolumeOptions":
                    {"DriverConfig": {"Name": "local", "Options":
                        {"type": "none", "o": "ro,rbind", "device": "/run"}}}}]}),
                "bind-mount",
            ),
            (json!({"Devices": [{"PathOnHost": "/dev/kvm"}]}), "devices"),
            (json!({"DeviceRequests": [{"Count": -1}]}), "devices"),
            (json!({"CapAdd": ["SYS_ADMIN"]}), "cap-add"),
            (json!({"CapAdd": ["ALL"]}), "cap-add"),
            (json!({"SecurityOpt": ["seccomp=unconfined"]}), "unconfined"),
            (
                json!({"SecurityOpt": ["apparmor:unconfined"]}),
                "unconfined",
            ),
        ] {
            assert_eq!(
                rule(create(json!({"Image": "busybox", "HostConfig": hc}))),
                want,
                "{hc}"
            );
        }
        // Named volumes and tmpfs are the job's own.
        let vols = json!({"Image": "busybox", "HostConfig": {"Mounts": [{"Type": "volume", "Source": "v", "Target": "/v"}, {"Type": "tmpfs", "Target": "/t"}]}});
        assert_eq!(rule(create(vols)), "allow");
        // A volume that binds a path is a bind mount.
        assert!(p.needs_body(&Method::POST, "/v1.41/volumes/create"));
        let volume = |opts: serde_json::Value| {
            let uri: hyper::Uri = "/v1.41/volumes/create".parse().unwrap();
            let body = json!({"Name": "v", "Driver": "local", "DriverOpts": opts}).to_string();
            rule(p.decide(
                &Method::POST,
                &uri,
                &HeaderMap::new(),
                Some(body.as_bytes()),
            ))
        };
        let bind = |device: &str| json!({"type": "none", "o": "bind", "device": device});
        assert_eq!(volume(bind("/run")), "bind-mount");
        assert_eq!(volume(bind("/var/run/docker.sock")), "bind-mount");
        assert_eq!(volume(bind("/srv/cache/npm")), "allow");
        assert_eq!(
            volume(json!({"type": "tmpfs", "o": "size=64m", "device": "tmpfs"})),
            "allow"
        );
        assert_eq!(volume(json!({})), "allow");
        // Images: Docker Hub names are docker.io's; others by their host.
        assert_eq!(rule(create(json!({"Image": "ghcr.io/a/b:1"}))), "registry");
        assert_eq!(
            rule(create(json!({"Image": "registry.example:5000/team/app"}))),
            "allow"
        );
        assert_eq!(
            rule(create(json!({"Image": "library/busybox@sha256:00"}))),
            "allow"
        );
        let pull: hyper::Uri = "/v1.41/images/create?fromImage=quay.io%2Fx%2Fy&tag=1"
            .parse()
            .unwrap();
        assert_eq!(
            rule(p.decide(&Method::POST, &pull, &HeaderMap::new(), None)),
            "registry"
        );
        let build: hyper::Uri = "/build?t=x&networkmode=host".parse().unwrap();
        assert_eq!(
            rule(p.decide(&Method::POST, &build, &HeaderMap::new(), None)),
            "host-network"
        );
        let exec: hyper::Uri = "/containers/abc/exec".parse().unwrap();
        assert_eq!(
            rule(p.decide(
                &Method::POST,
                &exec,
                &HeaderMap::new(),
                Some(br#"{"Cmd":["sh"],"Privileged":true}"#)
            )),
            "privileged"
        );
        assert_eq!(
            rule(p.decide(&Method::POST, &exec, &HeaderMap::new(), Some(b"{not json"))),
            "unreadable-body"
        );
        // allow-all lets everything through.
        let uri: hyper::Uri = "/containers/create".parse().unwrap();
        assert!(
            Policy::default()
                .decide(
                    &Method::POST,
                    &uri,
                    &HeaderMap::new(),
                    Some(br#"{"HostConfig":{"Privileged":true}}"#)
                )
                .is_ok()
        );
    }

    #[test]
    fn the_section_is_checked_key_by_key() {
        Policy::default().validate().unwrap();
        strict().validate().unwrap();
        let bad = |p: Policy| p.validate().unwrap_err().0;
        assert_eq!(
            bad(Policy {
                allowed_bind_sources: vec!["srv".into()],
                ..strict()
            }),
            "policy.allowed_bind_sources"
        );
        assert_eq!(
            bad(Policy {
                allowed_capabilities: vec!["FLY".into()],
                ..strict()
            }),
            "policy.allowed_capabilities"
        );
        assert_eq!(
            bad(Policy {
                max_body_bytes: 10,
                ..strict()
            }),
            "policy.max_body_bytes"
        );
        assert_eq!(registry("busybox"), "docker.io");
        assert_eq!(registry("localhost/x"), "localhost");
        assert_eq!(registry("a/b"), "docker.io");
    }
}
