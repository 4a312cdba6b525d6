//! berth's certificate authority and the identities it issues.
//!
//! Keys are ECDSA P-256: generated in about a millisecond (the docker:dind
//! entrypoint spends seconds on RSA-4096) and accepted by every Docker client
//! stack (Go's crypto/tls, OpenSSL for docker-py, rustls for bollard).
//!
//! Layout of a certs dir (docker:dind's `DOCKER_TLS_CERTDIR` plus `admin/`):
//! `ca/{cert,key}.pem`, `server/{ca,cert,key}.pem`, `client/{ca,cert,key}.pem`,
//! `admin/{ca,cert,key}.pem`. Keys are 0600, written to a temp file and
//! renamed. The identity of a client certificate is a URI SAN:
//! `urn:berth:job:<id>` or `urn:berth:admin`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, string::Ia5String,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::files::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Who a client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Opens the job API (`/berth/v1/...`) only.
    Admin,
    /// Opens the Docker API of one job.
    Job(String),
}

const URI_ADMIN: &str = "urn:berth:admin";
const URI_JOB: &str = "urn:berth:job:";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdentityError {
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    #[error("the client certificate names no berth identity")]
    None,
    #[error("the client certificate names more than one berth identity")]
    Ambiguous,
    #[error("the client certificate names a malformed job id")]
    BadJobId,
}

impl Identity {
    pub fn uri(&self) -> String {
        match self {
            Identity::Admin => URI_ADMIN.into(),
            Identity::Job(id) => format!("{URI_JOB}{id}"),
        }
    }

    /// Reads the identity from a (verified) client certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparsable)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::Unparsable)?
            .ok_or(IdentityError::None)?;
        let mut found = None;
        for name in &san.value.general_names {
            let x509_parser::extensions::GeneralName::URI(uri) = name else {
                continue;
            };
            let id = if *uri == URI_ADMIN {
                Identity::Admin
            } else if let Some(job) = uri.strip_prefix(URI_JOB) {
                if !valid_job_id(job) {
                    return Err(IdentityError::BadJobId);
                }
                Identity::Job(job.to_string())
            } else {
                continue;
            };
            if found.replace(id).is_some() {
                return Err(IdentityError::Ambiguous);
            }
        }
        found.ok_or(IdentityError::None)
    }
}

/// Job ids are 12 lowercase hex digits.
pub fn valid_job_id(id: &str) -> bool {
    id.len() == 12
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// PEM material handed to a client or a server.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Bundle {
    /// The bundle in `dir`, if all three files are there.
    pub fn read_from(dir: &Path) -> Option<Bundle> {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        Some(Bundle {
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
        })
    }

    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir` (created 0700);
    /// every file 0600, through a temp file and a rename.
    pub fn write_to(&self, dir: &Path) -> Result<(), PkiError> {
        make_private_dir(dir)?;
        for (name, body) in [
            ("ca.pem", &self.ca_pem),
            ("cert.pem", &self.cert_pem),
            ("key.pem", &self.key_pem),
        ] {
            let path = dir.join(name);
            write_atomic(&path, body.as_bytes(), 0o600)
                .map_err(|source| PkiError::Write { path, source })?;
        }
        Ok(())
    }
}

fn make_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Write {
            path: dir.into(),
            source,
        })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.into(),
        source,
    })
}

fn serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// The agent's certificate authority.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Clock skew tolerated between the agent and its clients.
const BACKDATE: Duration = Duration::from_secs(300);

impl Ca {
    /// Loads `<dir>/ca/{cert,key}.pem` (a CA of your own works: any CA
    /// certificate with its key), or creates a new CA there.
    pub fn load_or_create(certs_dir: &Path) -> Result<Ca, PkiError> {
        let ca_dir = certs_dir.join("ca");
        let (cert_path, key_path) = (ca_dir.join("cert.pem"), ca_dir.join("key.pem"));
        if cert_path.exists() || key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
                path: key_path.clone(),
                why: format!("not a usable private key: {e}"),
            })?;
            check_key_matches(&cert_pem, &key, &cert_path)?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Invalid {
                    path: cert_path.clone(),
                    why: format!("not a CA certificate: {e}"),
                })?;
            return Ok(Ca { cert_pem, issuer });
        }
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("berth CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(serial());
        let now = OffsetDateTime::now_utc();
        p.not_before = now - BACKDATE;
        p.not_after = now + CA_VALIDITY;
        let cert = p.self_signed(&key)?;
        make_private_dir(&ca_dir)?;
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(|source| {
            PkiError::Write {
                path: key_path.clone(),
                source,
            }
        })?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644).map_err(|source| {
            PkiError::Write {
                path: cert_path.clone(),
                source,
            }
        })?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names and IP addresses).
    pub fn issue_server(&self, names: &[String]) -> Result<Bundle, PkiError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("berth server");
        p.subject_alt_names = names.iter().filter_map(|n| san_of(n)).collect();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        self.issue(p, now + SERVER_VALIDITY)
    }

    /// A client certificate for `who`, valid until `not_after`.
    pub fn issue_client(
        &self,
        who: &Identity,
        not_after: OffsetDateTime,
    ) -> Result<Bundle, PkiError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&match who {
            Identity::Admin => "berth admin".to_string(),
            Identity::Job(id) => format!("berth job {id}"),
        });
        let uri = Ia5String::try_from(who.uri())?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p, not_after)
    }

    fn issue(
        &self,
        mut p: CertificateParams,
        not_after: OffsetDateTime,
    ) -> Result<Bundle, PkiError> {
        let key = KeyPair::generate()?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.serial_number = Some(serial());
        p.not_before = OffsetDateTime::now_utc() - BACKDATE;
        p.not_after = not_after;
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Bundle {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Keeps `<dir>/server/` current: re-issues the server certificate when
    /// its names differ from `names`, it expires within 30 days, or it was
    /// not signed by this CA.
    pub fn ensure_server(&self, certs_dir: &Path, names: &[String]) -> Result<Bundle, PkiError> {
        let dir = certs_dir.join("server");
        let existing = Bundle::read_from(&dir)
            .filter(|b| b.ca_pem == self.cert_pem && server_cert_current(&b.cert_pem, names));
        if let Some(b) = existing {
            return Ok(b);
        }
        let b = self.issue_server(names)?;
        b.write_to(&dir)?;
        Ok(b)
    }

    /// The admin bundle in `<dir>/admin/`, issued once.
    pub fn ensure_admin(&self, certs_dir: &Path) -> Result<Bundle, PkiError> {
        let dir = certs_dir.join("admin");
        if let Some(b) = Bundle::read_from(&dir).filter(|b| b.ca_pem == self.cert_pem) {
            return Ok(b);
        }
        let b = self.issue_client(&Identity::Admin, OffsetDateTime::now_utc() + CA_VALIDITY)?;
        b.write_to(&dir)?;
        Ok(b)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d
}

fn san_of(name: &str) -> Option<SanType> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(SanType::IpAddress(ip));
    }
    Ia5String::try_from(name).ok().map(SanType::DnsName)
}

fn check_key_matches(cert_pem: &str, key: &KeyPair, path: &Path) -> Result<(), PkiError> {
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| PkiError::Invalid {
            path: path.into(),
            why: "no PEM certificate in the file".into(),
        })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Invalid {
        path: path.into(),
        why: format!("unparsable certificate: {e}"),
    })?;
    if *cert.public_key().subject_public_key.data != *key.public_key_raw() {
        return Err(PkiError::Invalid {
            path: path.into(),
            why: "the CA certificate does not belong to ca/key.pem".into(),
        });
    }
    Ok(())
}

/// True when `cert_pem` names exactly `names` and is valid for 30 more days.
fn server_cert_current(cert_pem: &str, names: &[String]) -> bool {
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next() else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let horizon = OffsetDateTime::now_utc() + Duration::from_secs(30 * 86400);
    if cert.validity().not_after.to_datetime() < horizon {
        return false;
    }
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let mut have: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let mut want: Vec<String> = names
        .iter()
        .map(|n| {
            n.parse::<IpAddr>()
                .map(|ip| ip.to_string())
                .unwrap_or(n.clone())
        })
        .collect();
    have.sort();
    have.dedup();
    want.sort();
    want.dedup();
    have == want
}

/// Names a server certificate should carry: localhost, loopback addresses,
/// the host's name and its interface addresses, `docker`, and `extra`.
///
/// `docker` is the name docker:dind's own server certificate carries: a
/// pipeline written for a `docker:dind` service says
/// `DOCKER_HOST=tcp://docker:2376`, and a CI executor that points that name
/// at the agent (examples/gitlab) must find it valid.
pub fn host_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "docker".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ];
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.push(h.to_string());
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                names.push(v4.ip().to_string());
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                let ip = v6.ip();
                // Link-local addresses need a zone and never appear in URLs.
                if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                    names.push(ip.to_string());
                }
            }
        }
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// `berth certs init`: docker:dind's `DOCKER_TLS_CERTDIR` layout in `dir`
/// (`ca/`, `server/`, `client/`); `client/` holds the admin identity.
pub fn init_dind_layout(dir: &Path, extra_names: &[String]) -> Result<(), PkiError> {
    let ca = Ca::load_or_create(dir)?;
    ca.ensure_server(dir, &host_names(extra_names))?;
    let admin = ca.ensure_admin(dir)?;
    admin.write_to(&dir.join("client"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn identities_round_trip_through_certificates() {
        let d = tmp("ident");
        let ca = Ca::load_or_create(&d).unwrap();
        let later = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        let job = ca
            .issue_client(&Identity::Job("0123456789ab".into()), later)
            .unwrap();
        assert_eq!(
            Identity::from_cert_der(&der_of(&job.cert_pem)).unwrap(),
            Identity::Job("0123456789ab".into())
        );
        let admin = ca.issue_client(&Identity::Admin, later).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der_of(&admin.cert_pem)).unwrap(),
            Identity::Admin
        );
        // A server certificate names no identity.
        let server = ca.issue_server(&["localhost".into()]).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der_of(&server.cert_pem)),
            Err(IdentityError::None)
        );
        assert_eq!(
            Identity::from_cert_der(b"garbage"),
            Err(IdentityError::Unparsable)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_job_ids_are_refused() {
        assert!(valid_job_id("0123456789ab"));
        for bad in [
            "",
            "0123456789AB",
            "0123456789a",
            "../../etc/xx",
            "0123456789abc",
        ] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn keys_are_0600_and_the_ca_persists() {
        let d = tmp("persist");
        let ca1 = Ca::load_or_create(&d).unwrap();
        let ca2 = Ca::load_or_create(&d).unwrap();
        assert_eq!(ca1.cert_pem(), ca2.cert_pem());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("ca/key.pem")), 0o600);
        init_dind_layout(&d, &["ci.example".into()]).unwrap();
        for sub in ["server", "client", "admin"] {
            for f in ["ca.pem", "cert.pem", "key.pem"] {
                assert!(d.join(sub).join(f).exists(), "{sub}/{f}");
            }
            assert_eq!(mode(&d.join(sub).join("key.pem")), 0o600);
        }
        let client = std::fs::read_to_string(d.join("client/cert.pem")).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der_of(&client)).unwrap(),
            Identity::Admin
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn server_cert_is_reissued_only_when_names_change() {
        let d = tmp("reissue");
        let ca = Ca::load_or_create(&d).unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".into()];
        let a = ca.ensure_server(&d, &names).unwrap();
        let b = ca.ensure_server(&d, &names).unwrap();
        assert_eq!(a.cert_pem, b.cert_pem);
        let c = ca
            .ensure_server(&d, &[names[0].clone(), "10.1.2.3".into()])
            .unwrap();
        assert_ne!(a.cert_pem, c.cert_pem);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_server_certificate_answers_to_docker_like_dind() {
        let names = host_names(&["ci.example".into()]);
        for want in ["docker", "localhost", "127.0.0.1", "ci.example"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        // A certificate issued before `docker` was among the names is
        // re-issued with it.
        let d = tmp("docker-name");
        let ca = Ca::load_or_create(&d).unwrap();
        let old: Vec<String> = names.iter().filter(|n| *n != "docker").cloned().collect();
        let before = ca.ensure_server(&d, &old).unwrap();
        let after = ca.ensure_server(&d, &names).unwrap();
        assert_ne!(before.cert_pem, after.cert_pem);
        let der = der_of(&after.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName("docker"))),
            "{:?}",
            san.value.general_names
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bring_your_own_ca_must_match_its_key() {
        let d = tmp("byo");
        Ca::load_or_create(&d).unwrap();
        let other = KeyPair::generate().unwrap();
        std::fs::write(d.join("ca/key.pem"), other.serialize_pem()).unwrap();
        let err = Ca::load_or_create(&d).err().unwrap().to_string();
        assert!(err.contains("does not belong"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
