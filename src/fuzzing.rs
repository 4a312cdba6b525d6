//! Entries for the fuzz targets in `fuzz/` (built by `cargo fuzz`, which
//! sets `--cfg fuzzing`): each takes untrusted bytes the way the agent
//! does and must answer with a value or an error, never a panic, a hang or
//! unbounded memory.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::frontdoor::policy::{Policy, Profile};
use crate::oidc::{TokenConfig, Verifier};

/// A request head and body, as text: `METHOD TARGET`, header lines, a
/// blank line, the body. The strict profile decides it (reading the body
/// where it asks for one), then the admin's path check.
pub fn policy(data: &[u8]) {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    let policy = POLICY.get_or_init(|| Policy {
        profile: Profile::Strict,
        allowed_bind_sources: vec!["/work".into(), "/var/lib/ci".into()],
        allowed_capabilities: vec!["NET_ADMIN".into()],
        allowed_registries: vec!["docker.io".into(), "registry.test:5000".into()],
        max_body_bytes: 1 << 20,
    });
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let mut lines = head.lines();
    let Some((method, target)) = lines.next().and_then(|l| l.split_once(' ')) else {
        return;
    };
    let (Ok(method), Ok(uri)) = (
        hyper::Method::from_bytes(method.as_bytes()),
        target.parse::<hyper::Uri>(),
    ) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    let body = policy
        .needs_body(&method, uri.path())
        .then_some(body)
        .filter(|b| b.len() <= policy.max_body_bytes);
    let _ = policy.decide(&method, &uri, &headers, body);
    let _ = crate::frontdoor::policy::decide_admin(&method, uri.path());
}

/// A job API request body (`POST /berth/v1/jobs`), then what the agent
/// checks of it before any job starts.
pub fn job_request(data: &[u8]) {
    if let Ok(spec) = serde_json::from_slice::<crate::jobs::CreateJob>(data) {
        let _ = spec.cache();
        if let Some(l) = &spec.limits {
            let _ = l.validate();
        }
    }
}

/// The configuration file's text, parsed and checked.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::cli::check_config_text(text);
    }
}

/// A pipeline file's text.
pub fn pipeline(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            crate::pipeline::Pipeline::parse(text, Path::new("fuzz.toml"), PathBuf::from("/ci"));
    }
}

/// A client certificate (DER), as the front door reads its identity.
pub fn certificate(data: &[u8]) {
    let _ = crate::pki::Identity::from_cert_der(data);
}

/// The token exchange's verifier, with one issuer whose key this module
/// holds, and rules with patterns, labels, workspaces and cache keys.
struct Issuer {
    verifier: Verifier,
    key: jsonwebtoken::EncodingKey,
    rt: tokio::runtime::Runtime,
}

const ISSUER: &str = "https://ci.fuzz.test";

fn issuer() -> &'static Issuer {
    static ISS: OnceLock<Issuer> = OnceLock::new();
    ISS.get_or_init(|| {
        let pair = rcgen::KeyPair::generate().expect("a P-256 key");
        let key = jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256)
                .expect("the key's public half");
        jwk.common.key_id = Some("k1".into());
        let jwks =
            std::env::temp_dir().join(format!("berth-fuzz-jwks-{}.json", std::process::id()));
        std::fs::write(&jwks, serde_json::json!({ "keys": [jwk] }).to_string()).expect("jwks");
        let cfg: TokenConfig = toml::from_str(&format!(
            r#"
enabled = true
[[issuers]]
issuer = "{ISSUER}"
jwks_file = {jwks:?}
algorithms = ["ES256", "RS256"]
[[rules]]
name = "main"
issuer = "{ISSUER}"
claims = {{ repository = "acme/*", ref = "refs/heads/*" }}
labels = ["repository", "run_id", "ref"]
workspaces = ["/ci/*/work"]
cache_key = "ci/{{repository}}/{{ref}}"
cache_write = true
[[rules]]
name = "any"
issuer = "{ISSUER}"
claims = {{ sub = "*" }}
cache_key = "shared"
"#
        ))
        .expect("the fuzz rules parse");
        cfg.validate().expect("the fuzz rules are valid");
        Issuer {
            verifier: Verifier::new(&cfg).expect("the fuzz verifier"),
            key,
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
        }
    })
}

/// Any bytes as a token.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let iss = issuer();
    if let Ok(v) = iss.rt.block_on(iss.verifier.verify(text)) {
        let _ = v.grant.allows_workspace(Path::new("/ci/x/work"));
    }
}

/// Any JSON as the claims of a token its issuer signed: the checks after
/// the signature (expiry, audience, issuer) and the rules' decision.
pub fn claims(data: &[u8]) {
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let iss = issuer();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let Ok(jwt) = jsonwebtoken::encode(&header, &claims, &iss.key) else {
        return;
    };
    if let Ok(v) = iss.rt.block_on(iss.verifier.verify(&jwt)) {
        let _ = v.grant.allows_workspace(Path::new("/ci/x/work"));
    }
}
