//! Registry settings every job's dockerd gets: mirrors for Docker Hub pulls,
//! registries reached over plain HTTP (`insecure`), and private CAs per
//! registry. Checked when the configuration loads, read once when the engine
//! starts, and installed into each job (`daemon.json`,
//! `/etc/docker/certs.d/HOST/ca.crt`) before its dockerd starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::sandbox::config::ConfigError;

/// `[registries]` in berth.toml.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registries {
    /// Pull-through mirrors for Docker Hub (`docker.io`) images, tried in
    /// order before Docker Hub itself: `https://HOST[:PORT]` or `http://…`.
    pub mirrors: Vec<String>,
    /// Registries spoken to over plain HTTP (or TLS without verification):
    /// `HOST[:PORT]` or a CIDR.
    pub insecure: Vec<String>,
    /// A private CA per registry: `"HOST[:PORT]" = "/path/ca.pem"`.
    pub ca: BTreeMap<String, PathBuf>,
}

/// The settings as installed into a job: the CAs' certificates read.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub mirrors: Vec<String>,
    pub insecure: Vec<String>,
    /// (registry, its CA certificates as PEM).
    pub cas: Vec<(String, String)>,
}

fn invalid(key: String, why: String) -> ConfigError {
    ConfigError::InvalidAt { key, why }
}

/// `HOST[:PORT]` as dockerd and `certs.d` name a registry: a DNS name or an
/// IPv4 address, or an IPv6 address in brackets, and an optional port.
fn valid_registry_host(s: &str) -> Result<(), String> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: an IPv6 address needs its closing ']'"))?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{s:?}: {v6:?} is not an IPv6 address"))?;
            match after {
                "" => (v6, None),
                p => (
                    v6,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{s:?}: expected :PORT after the address"))?,
                    ),
                ),
            }
        }
        None => match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        },
    };
    if s.contains("://") {
        return Err(format!("{s:?}: give HOST[:PORT], without a scheme"));
    }
    if !s.starts_with('[')
        && (host.is_empty()
            || host.starts_with(['.', '-'])
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        return Err(format!("{s:?}: {host:?} is not a host name or address"));
    }
    if let Some(p) = port
        && !p.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Err(format!("{s:?}: {p:?} is not a port (1-65535)"));
    }
    Ok(())
}

fn valid_cidr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(ip, bits)| {
        match (ip.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
            (Ok(std::net::IpAddr::V4(_)), Ok(b)) => b <= 32,
            (Ok(std::net::IpAddr::V6(_)), Ok(b)) => b <= 128,
            _ => false,
        }
    })
}

fn valid_mirror(s: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("{s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{s:?}: a mirror is an http:// or https:// URL"));
    }
    if url.host_str().is_none() {
        return Err(format!("{s:?}: no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{s:?}: credentials do not belong in a mirror URL (every job can read it)"
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?}: dockerd takes a mirror's root URL, without a path, query or fragment"
        ));
    }
    Ok(())
}

/// The certificates of a PEM file, checked to be at least one.
fn read_ca(path: &Path) -> Result<String, String> {
    if !path.is_absolute() {
        return Err(format!("{} must be an absolute path", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(text)
}

impl Registries {
    /// Checks every entry (CA files included); the error names the key.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        for (i, m) in self.mirrors.iter().enumerate() {
            valid_mirror(m).map_err(|why| invalid(format!("registries.mirrors[{i}]"), why))?;
        }
        for (i, r) in self.insecure.iter().enumerate() {
            if !valid_cidr(r) {
                valid_registry_host(r)
                    .map_err(|why| invalid(format!("registries.insecure[{i}]"), why))?;
            }
        }
        let mut cas = Vec::new();
        for (host, path) in &self.ca {
            let key = || format!("registries.ca.{host:?}");
            valid_registry_host(host).map_err(|why| invalid(key(), why))?;
            cas.push((
                host.clone(),
                read_ca(path).map_err(|why| invalid(key(), why))?,
            ));
        }
        Ok(Loaded {
            mirrors: self.mirrors.clone(),
            insecure: self.insecure.clone(),
            cas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(r: &Registries) -> String {
        match r.load().unwrap_err() {
            ConfigError::InvalidAt { key, .. } => key,
            e => panic!("{e}"),
        }
    }

    #[test]
    fn every_bad_entry_is_named() {
        let m = |s: &str| Registries {
            mirrors: vec!["https://ok.example".into(), s.into()],
            ..Default::default()
        };
        for bad in [
            "mirror.example:5000",
            "ftp://mirror.example",
            "https://user:pw@mirror.example",
            "https://mirror.example/v2/",
        ] {
            assert_eq!(key_of(&m(bad)), "registries.mirrors[1]", "{bad}");
        }
        m("http://10.0.0.1:5000/").load().unwrap();
        let i = |s: &str| Registries {
            insecure: vec![s.into()],
            ..Default::default()
        };
        for bad in ["http://r.example", "r.example:0", "r.example:x", "../x", ""] {
            assert_eq!(key_of(&i(bad)), "registries.insecure[0]", "{bad:?}");
        }
        for good in ["r.example:5000", "10.1.0.0/16", "[::1]:5000", "localhost"] {
            i(good).load().unwrap();
        }
    }

    #[test]
    fn a_ca_must_be_a_readable_pem_certificate() {
        let dir = std::env::temp_dir().join(format!("berth-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let c = |host: &str, path: PathBuf| Registries {
            ca: BTreeMap::from([(host.to_string(), path)]),
            ..Default::default()
        };
        let e = c("r.example:5443", not_pem).load().unwrap_err().to_string();
        assert!(
            e.contains("registries.ca.\"r.example:5443\"") && e.contains("no PEM"),
            "{e}"
        );
        let e = c("r.example", dir.join("missing.pem"))
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let e = c("r.example", "rel.pem".into())
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["r.example".into()]).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        let e = c("../../etc", good.clone()).load().unwrap_err().to_string();
        assert!(e.contains("registries.ca"), "{e}");
        let l = c("r.example:5443", good).load().unwrap();
        assert_eq!(l.cas[0].0, "r.example:5443");
        assert!(l.cas[0].1.contains("BEGIN CERTIFICATE"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
