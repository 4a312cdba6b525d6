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

use super::UrlError;

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

/// An entry of `[registries]` that is not valid: which one, and why.
#[derive(Debug, thiserror::Error)]
pub enum RegistriesError {
    #[error("registries.mirrors[{index}]: {source}")]
    Mirror { index: usize, source: EntryError },
    #[error("registries.insecure[{index}]: {source}")]
    Insecure { index: usize, source: EntryError },
    #[error("registries.ca.{host:?}: {source}")]
    Ca { host: String, source: EntryError },
}

/// What is wrong with one entry: a registry's `HOST[:PORT]`, a mirror's URL
/// or a CA file.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("{entry:?}: an IPv6 address needs its closing ']'")]
    UnclosedIpv6 { entry: String },
    #[error("{entry:?}: {addr:?} is not an IPv6 address")]
    NotIpv6 { entry: String, addr: String },
    #[error("{entry:?}: expected :PORT after the address")]
    NoPortAfterAddress { entry: String },
    #[error("{entry:?}: give HOST[:PORT], without a scheme")]
    Scheme { entry: String },
    #[error("{entry:?}: {host:?} is not a host name or address")]
    NotAHost { entry: String, host: String },
    #[error("{entry:?}: {port:?} is not a port (1-65535)")]
    NotAPort { entry: String, port: String },
    #[error("{entry:?}: {source}")]
    MirrorUrl { entry: String, source: UrlError },
    #[error("{entry:?}: a mirror is an http:// or https:// URL")]
    MirrorScheme { entry: String },
    #[error("{entry:?}: no host")]
    MirrorNoHost { entry: String },
    #[error("{entry:?}: credentials do not belong in a mirror URL (every job can read it)")]
    MirrorCredentials { entry: String },
    #[error("{entry:?}: dockerd takes a mirror's root URL, without a path, query or fragment")]
    MirrorPath { entry: String },
    #[error("{} must be an absolute path", .path.display())]
    RelativeCa { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", .path.display())]
    NoCertificate { path: PathBuf },
}

/// `HOST[:PORT]` as dockerd and `certs.d` name a registry: a DNS name or an
/// IPv4 address, or an IPv6 address in brackets, and an optional port.
fn valid_registry_host(s: &str) -> Result<(), EntryError> {
    let entry = || s.to_string();
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest
                .split_once(']')
                .ok_or_else(|| EntryError::UnclosedIpv6 { entry: entry() })?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| EntryError::NotIpv6 {
                    entry: entry(),
                    addr: v6.into(),
                })?;
            match after {
                "" => (v6, None),
                p => (
                    v6,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| EntryError::NoPortAfterAddress { entry: entry() })?,
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
        return Err(EntryError::Scheme { entry: entry() });
    }
    if !s.starts_with('[')
        && (host.is_empty()
            || host.starts_with(['.', '-'])
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        return Err(EntryError::NotAHost {
            entry: entry(),
            host: host.into(),
        });
    }
    if let Some(p) = port
        && !p.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Err(EntryError::NotAPort {
            entry: entry(),
            port: p.into(),
        });
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

fn valid_mirror(s: &str) -> Result<(), EntryError> {
    let entry = || s.to_string();
    let url = reqwest::Url::parse(s).map_err(|source| EntryError::MirrorUrl {
        entry: entry(),
        source,
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EntryError::MirrorScheme { entry: entry() });
    }
    if url.host_str().is_none() {
        return Err(EntryError::MirrorNoHost { entry: entry() });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EntryError::MirrorCredentials { entry: entry() });
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(EntryError::MirrorPath { entry: entry() });
    }
    Ok(())
}

/// The certificates of a PEM file, checked to be at least one.
fn read_ca(path: &Path) -> Result<String, EntryError> {
    if !path.is_absolute() {
        return Err(EntryError::RelativeCa { path: path.into() });
    }
    let text = std::fs::read_to_string(path).map_err(|source| EntryError::ReadCa {
        path: path.into(),
        source,
    })?;
    let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| EntryError::Pem {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(EntryError::NoCertificate { path: path.into() });
    }
    Ok(text)
}

impl Registries {
    /// Checks every entry (CA files included); the error names the key.
    pub fn load(&self) -> Result<Loaded, RegistriesError> {
        for (index, m) in self.mirrors.iter().enumerate() {
            valid_mirror(m).map_err(|source| RegistriesError::Mirror { index, source })?;
        }
        for (index, r) in self.insecure.iter().enumerate() {
            if !valid_cidr(r) {
                valid_registry_host(r)
                    .map_err(|source| RegistriesError::Insecure { index, source })?;
            }
        }
        let mut cas = Vec::new();
        for (host, path) in &self.ca {
            let ca = |source| RegistriesError::Ca {
                host: host.clone(),
                source,
            };
            valid_registry_host(host).map_err(ca)?;
            cas.push((host.clone(), read_ca(path).map_err(ca)?));
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

    /// The key an error names (what comes before its first ": ").
    fn key_of(r: &Registries) -> String {
        let e = r.load().unwrap_err().to_string();
        e.split_once(": ").map(|(k, _)| k.to_string()).unwrap_or(e)
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
        assert_eq!(
            m("ftp://mirror.example").load().unwrap_err().to_string(),
            "registries.mirrors[1]: \"ftp://mirror.example\": a mirror is an http:// or https:// URL"
        );
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
