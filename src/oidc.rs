//! Workload identities: a CI platform's OIDC token (a Kubernetes projected
//! service-account token, a GitHub Actions or GitLab CI ID token) checked
//! against its issuer's keys, audience, expiry and issuer, used once, and
//! mapped by the agent's rules to what the job it asks for may get. The
//! JOSE work is `jsonwebtoken`'s; this module picks the issuer, its keys
//! and the rule, and remembers what was used.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::duration::text;
use crate::locks::Lock;
use crate::sandbox::Limits;
use crate::sandbox::fs::caches::Key;

/// `[token]` of berth.toml: the token exchange, off unless enabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    pub enabled: bool,
    /// A listener of its own (TLS with server authentication only), so the
    /// front door keeps refusing every handshake without a certificate.
    pub listen: std::net::SocketAddr,
    /// The `aud` every token must name.
    pub audience: String,
    /// Tolerated clock skew for `exp` and `nbf`.
    #[serde(with = "text")]
    pub leeway: Duration,
    /// Issuers whose tokens are taken, with where their keys are.
    pub issuers: Vec<IssuerConfig>,
    /// The first rule that matches a token says what its job gets; a token
    /// no rule matches is refused.
    pub rules: Vec<Rule>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            enabled: false,
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 2377)),
            audience: "berth".into(),
            leeway: Duration::from_secs(30),
            issuers: Vec::new(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim, exactly.
    pub issuer: String,
    /// Its signing keys as a JWKS document on disk.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Or fetched over HTTPS: this URL, or (with neither) the `jwks_uri`
    /// of `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A CA to trust for those fetches (a cluster's own API server); the
    /// system's roots otherwise.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Signature algorithms taken from this issuer (asymmetric only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Named in the audit and in the job's `berth.rule` label.
    pub name: String,
    pub issuer: String,
    /// Claim → pattern; every one must match (`*` matches any run of
    /// characters). A claim the token lacks never matches.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// Claims copied into the job's labels (`oidc.<claim>`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// The longest job this rule grants (the agent's max_ttl caps it too).
    #[serde(default, with = "text::option")]
    pub max_ttl: Option<Duration>,
    /// Limits for its jobs (what a job asks is capped by these).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Workspaces a token may ask for: patterns of absolute paths (`*`
    /// matches any run of characters). None by default. The agent's
    /// `[workspaces] allowed_roots` apply too.
    #[serde(default)]
    pub workspaces: Vec<String>,
    /// The project cache its jobs start from: a key whose every `{claim}`
    /// is the token's claim (`"github/{repository}"`), so that a token
    /// never picks another project's key. None: no cache.
    #[serde(default)]
    pub cache_key: Option<String>,
    /// Whether its jobs may commit to that key (a protected branch's
    /// rule). Otherwise they start from it and never write it (a pull
    /// request's).
    #[serde(default)]
    pub cache_write: bool,
}

impl TokenConfig {
    /// Checked with the rest of the configuration: (key, why).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        if self.listen.port() == 2375 {
            return Err((
                "token.listen",
                "port 2375 is Docker's plaintext port; the token listener is TLS (use 2377)".into(),
            ));
        }
        if self.audience.is_empty() {
            return Err(("token.audience", "must not be empty".into()));
        }
        if self.issuers.is_empty() || self.rules.is_empty() {
            return Err((
                "token",
                "enabled with no [[token.issuers]] or no [[token.rules]]: no token could ever be taken".into(),
            ));
        }
        for (i, iss) in self.issuers.iter().enumerate() {
            if !iss.issuer.starts_with("https://") {
                return Err((
                    "token.issuers",
                    format!(
                        "[{i}] issuer {:?}: an OIDC issuer is an https:// URL",
                        iss.issuer
                    ),
                ));
            }
            if iss.jwks_file.is_some() && iss.jwks_url.is_some() {
                return Err((
                    "token.issuers",
                    format!("[{i}] {}: give jwks_file or jwks_url, not both", iss.issuer),
                ));
            }
            if let Some(u) = &iss.jwks_url
                && !u.starts_with("https://")
            {
                return Err((
                    "token.issuers",
                    format!("[{i}] jwks_url {u:?}: keys are fetched over https:// only"),
                ));
            }
            if iss.algorithms.is_empty() {
                return Err(("token.issuers", format!("[{i}] algorithms is empty")));
            }
            for a in &iss.algorithms {
                algorithm(a).map_err(|why| ("token.issuers", format!("[{i}] {why}")))?;
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            if !self.issuers.iter().any(|x| x.issuer == r.issuer) {
                return Err((
                    "token.rules",
                    format!(
                        "[{i}] {}: issuer {:?} is not in [[token.issuers]]",
                        r.name, r.issuer
                    ),
                ));
            }
            if r.claims.is_empty() {
                return Err((
                    "token.rules",
                    format!(
                        "[{i}] {}: a rule with no claims would take every token of its issuer; name at least one (e.g. repository = \"org/*\")",
                        r.name
                    ),
                ));
            }
            match &r.cache_key {
                Some(t) => {
                    expand(t, |_| Some("x".into())).map_err(|why| {
                        (
                            "token.rules",
                            format!("[{i}] {}: cache_key {t:?}: {why}", r.name),
                        )
                    })?;
                }
                None if r.cache_write => {
                    return Err((
                        "token.rules",
                        format!("[{i}] {}: cache_write needs a cache_key", r.name),
                    ));
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// `template` with every `{claim}` replaced by `value(claim)`; the text
/// around them as it is. A claim the token lacks, a brace left open, or a
/// key the store refuses is an error.
fn expand(template: &str, value: impl Fn(&str) -> Option<String>) -> Result<Key, String> {
    let mut key = String::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err("a '}' with no '{'".into());
        }
        key.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or("a '{' with no '}'")?;
        let name = &after[..close];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(format!("{{{name}}} is not a claim's name"));
        }
        key.push_str(&value(name).ok_or_else(|| format!("the token has no claim {name:?}"))?);
        rest = &after[close + 1..];
    }
    key.push_str(rest);
    Key::new(key).map_err(|e| e.to_string())
}

/// Asymmetric algorithms only: an HMAC "key" would be the issuer's public
/// key, which anyone has (the key-confusion attack).
fn algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(format!(
            "algorithm {other:?} is not taken (RS256/384/512, PS256/384/512, ES256/384, EdDSA)"
        )),
    }
}

/// Why a token was refused: the status the client gets and the rule the
/// audit names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("issuer {0:?} is not taken by this agent")]
    UnknownIssuer(String),
    #[error("the token is signed with {0}, which its issuer's configuration does not take")]
    Algorithm(String),
    #[error("no key {kid:?} of {issuer}")]
    UnknownKey { issuer: String, kid: String },
    #[error("the token is expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's audience is not {0:?}")]
    Audience(String),
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token was rejected: {0}")]
    Invalid(String),
    #[error("the token was used before; ask your CI platform for a new one")]
    Replayed,
    #[error("no rule of this agent grants a job to {subject} of {issuer}")]
    NoRule { issuer: String, subject: String },
    #[error("the keys of {issuer} cannot be read: {why}")]
    Keys { issuer: String, why: String },
    #[error("rule {rule} names a project cache this token cannot have: {why}")]
    CacheKey { rule: String, why: String },
}

impl TokenError {
    /// 401 for a token that proves nothing, 403 for a proven identity the
    /// rules do not grant, 503 when the agent cannot check.
    pub fn status(&self) -> u16 {
        match self {
            TokenError::NoRule { .. } | TokenError::CacheKey { .. } => 403,
            TokenError::Keys { .. } => 503,
            _ => 401,
        }
    }

    /// A short, stable name (the audit's rule, the metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token-malformed",
            TokenError::UnknownIssuer(_) => "token-issuer",
            TokenError::Algorithm(_) => "token-algorithm",
            TokenError::UnknownKey { .. } => "token-key",
            TokenError::Expired => "token-expired",
            TokenError::NotYetValid => "token-not-yet-valid",
            TokenError::Audience(_) => "token-audience",
            TokenError::Signature => "token-signature",
            TokenError::Invalid(_) => "token-invalid",
            TokenError::Replayed => "token-replayed",
            TokenError::NoRule { .. } => "token-no-rule",
            TokenError::Keys { .. } => "token-keys",
            TokenError::CacheKey { .. } => "token-cache-key",
        }
    }
}

/// What a verified token may get.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub rule: String,
    pub issuer: String,
    pub subject: String,
    pub labels: BTreeMap<String, String>,
    pub max_ttl: Option<Duration>,
    pub limits: Option<Limits>,
    /// Patterns of the workspaces its job may have.
    pub workspaces: Vec<String>,
    /// The project cache its job starts from, and whether it may commit.
    pub cache: Option<GrantedCache>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrantedCache {
    pub key: Key,
    pub write: bool,
}

impl Grant {
    /// Whether the job may have the workspace at `path` (lexically normal:
    /// absolute, no `.` or `..`).
    pub fn allows_workspace(&self, path: &std::path::Path) -> bool {
        crate::sandbox::fs::workspaces::normal(path).is_some_and(|p| {
            let p = p.to_string_lossy();
            self.workspaces.iter().any(|pat| glob(pat, &p))
        })
    }
}

/// A token that verified, not yet spent.
#[derive(Debug, Clone)]
pub struct Verified {
    pub grant: Grant,
    /// What a second use is recognised by: its `jti`, or its hash.
    once: String,
    exp: u64,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    /// A JWKS URL, or `None`: discovered from the issuer.
    Url(Option<String>),
}

struct Issuer {
    cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    source: Source,
    keys: Mutex<Keys>,
}

#[derive(Default)]
struct Keys {
    set: Option<JwkSet>,
    fetched: Option<Instant>,
    error: Option<String>,
}

/// A key set fetched again at most this often (an unknown `kid` asks for a
/// refresh: the issuer rotated its keys).
const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// Tokens remembered as used, at most; past this, expired ones are
/// forgotten first and then new tokens are refused until some expire.
const USED_MAX: usize = 100_000;

pub struct Verifier {
    audience: String,
    leeway: Duration,
    issuers: HashMap<String, Issuer>,
    rules: Vec<Rule>,
    /// Used tokens (jti, or the token's hash) → their `exp`.
    used: Mutex<HashMap<String, u64>>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl Verifier {
    /// Reads file key sets now (a bad one fails the start); fetched ones
    /// are read by [`Verifier::refresh`].
    pub fn new(cfg: &TokenConfig) -> Result<Verifier, TokenError> {
        let mut issuers = HashMap::new();
        let mut roots: Vec<reqwest::Certificate> = Vec::new();
        for c in &cfg.issuers {
            let algorithms = c
                .algorithms
                .iter()
                .map(|a| algorithm(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| keys_error(c, why))?;
            let source = match (&c.jwks_file, &c.jwks_url) {
                (Some(f), _) => Source::File(f.clone()),
                (None, u) => Source::Url(u.clone()),
            };
            let mut keys = Keys::default();
            if let Source::File(f) = &source {
                keys.set = Some(read_jwks(f).map_err(|why| keys_error(c, why))?);
            }
            if let Some(ca) = &c.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| keys_error(c, format!("ca_file {}: {e}", ca.display())))?;
                roots.push(
                    reqwest::Certificate::from_pem(&pem)
                        .map_err(|e| keys_error(c, format!("ca_file {}: {e}", ca.display())))?,
                );
            }
            issuers.insert(
                c.issuer.clone(),
                Issuer {
                    cfg: c.clone(),
                    algorithms,
                    source,
                    keys: Mutex::new(keys),
                },
            );
        }
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .timeout(Duration::from_secs(10));
        for r in roots {
            http = http.add_root_certificate(r);
        }
        let http = http.build().map_err(|e| TokenError::Keys {
            issuer: "*".into(),
            why: e.to_string(),
        })?;
        Ok(Verifier {
            audience: cfg.audience.clone(),
            leeway: cfg.leeway,
            issuers,
            rules: cfg.rules.clone(),
            used: Mutex::new(HashMap::new()),
            http,
        })
    }

    /// Fetches the key sets that come over HTTPS (at start; after that on
    /// an unknown key, at most once a minute per issuer).
    pub async fn refresh(&self) {
        for iss in self.issuers.values() {
            if matches!(iss.source, Source::Url(_)) {
                self.fetch(iss).await;
            }
        }
    }

    async fn fetch(&self, iss: &Issuer) {
        {
            let mut k = iss.keys.locked();
            if k.fetched.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
                return;
            }
            k.fetched = Some(Instant::now());
        }
        let r = self.fetch_jwks(iss).await;
        let mut k = iss.keys.locked();
        match r {
            Ok(set) => {
                k.set = Some(set);
                k.error = None;
            }
            Err(why) => {
                tracing::warn!(issuer = %iss.cfg.issuer, error = %why, "cannot fetch the issuer's keys");
                k.error = Some(why);
            }
        }
    }

    async fn fetch_jwks(&self, iss: &Issuer) -> Result<JwkSet, String> {
        let url = match &iss.source {
            Source::Url(Some(u)) => u.clone(),
            Source::Url(None) => {
                let disco = format!(
                    "{}/.well-known/openid-configuration",
                    iss.cfg.issuer.trim_end_matches('/')
                );
                let doc: serde_json::Value = self.get_json(&disco).await?;
                doc["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| format!("{disco} names no jwks_uri"))?
                    .to_string()
            }
            Source::File(_) => return Err("a file source is not fetched".into()),
        };
        self.get_json(&url).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("{url}: {}", r.status()));
        }
        r.json().await.map_err(|e| format!("{url}: {e}"))
    }

    /// Checks `token` and finds the rule that grants it a job. Nothing is
    /// remembered yet: [`Verifier::spend`] marks it used.
    pub async fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let token = token.trim();
        // The issuer picks the keys: read it before anything is trusted,
        // and trust nothing of it until the signature is checked.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Unverified>(token)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let issuer_name = unverified.claims.iss.unwrap_or_default();
        let iss = self
            .issuers
            .get(&issuer_name)
            .ok_or_else(|| TokenError::UnknownIssuer(issuer_name.clone()))?;
        let header = unverified.header;
        if !iss.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = match self.key(iss, header.kid.as_deref(), header.alg) {
            Ok(k) => k,
            // A rotated key, or keys not fetched yet (the issuer was down):
            // fetch again, at most once a minute.
            Err(TokenError::UnknownKey { .. } | TokenError::Keys { .. })
                if matches!(iss.source, Source::Url(_)) =>
            {
                self.fetch(iss).await;
                self.key(iss, header.kid.as_deref(), header.alg)?
            }
            Err(e) => return Err(e),
        };
        // The header's algorithm, already checked against the issuer's list:
        // the key's family must match it.
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway.as_secs();
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&iss.cfg.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| match refusal(e) {
                    TokenError::Audience(_) => TokenError::Audience(self.audience.clone()),
                    other => other,
                })?;
        let claims = data.claims;
        let grant = self.grant(&issuer_name, &claims)?;
        let once = match claims.get("jti").and_then(|j| j.as_str()) {
            Some(j) => format!("jti:{issuer_name}:{j}"),
            None => format!("sha256:{:x}", sha2::Sha256::digest(token.as_bytes())),
        };
        let exp = claims.get("exp").and_then(|e| e.as_u64()).unwrap_or(0);
        Ok(Verified { grant, once, exp })
    }

    fn key(
        &self,
        iss: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, TokenError> {
        let k = iss.keys.locked();
        let Some(set) = &k.set else {
            return Err(TokenError::Keys {
                issuer: iss.cfg.issuer.clone(),
                why: k.error.clone().unwrap_or_else(|| "not fetched yet".into()),
            });
        };
        let unknown = || TokenError::UnknownKey {
            issuer: iss.cfg.issuer.clone(),
            kid: kid.unwrap_or("").into(),
        };
        let jwk = match kid {
            Some(kid) => set.find(kid).ok_or_else(unknown)?,
            // No kid: only an issuer with one key can be meant.
            None if set.keys.len() == 1 => &set.keys[0],
            None => return Err(unknown()),
        };
        // A key that names its algorithm is used with that one only.
        if let Some(ka) = jwk.common.key_algorithm
            && ka.to_string().parse::<Algorithm>().ok() != Some(alg)
        {
            return Err(TokenError::Algorithm(format!("{alg:?} with a {ka} key")));
        }
        DecodingKey::from_jwk(jwk).map_err(|e| TokenError::Keys {
            issuer: iss.cfg.issuer.clone(),
            why: format!("key {:?}: {e}", kid.unwrap_or("")),
        })
    }

    fn grant(
        &self,
        issuer: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Grant, TokenError> {
        let subject = claim(claims, "sub").unwrap_or_default();
        let rule = self
            .rules
            .iter()
            .find(|r| {
                r.issuer == issuer
                    && r.claims
                        .iter()
                        .all(|(k, p)| claim(claims, k).is_some_and(|v| glob(p, &v)))
            })
            .ok_or_else(|| TokenError::NoRule {
                issuer: issuer.into(),
                subject: subject.clone(),
            })?;
        let mut labels = BTreeMap::new();
        labels.insert("berth.rule".to_string(), rule.name.clone());
        labels.insert("berth.subject".to_string(), subject.clone());
        for l in &rule.labels {
            if let Some(v) = claim(claims, l) {
                labels.insert(format!("oidc.{l}"), v);
            }
        }
        let cache = match &rule.cache_key {
            Some(t) => Some(GrantedCache {
                key: expand(t, |name| claim(claims, name)).map_err(|why| TokenError::CacheKey {
                    rule: rule.name.clone(),
                    why,
                })?,
                write: rule.cache_write,
            }),
            None => None,
        };
        Ok(Grant {
            rule: rule.name.clone(),
            issuer: issuer.into(),
            subject,
            labels,
            max_ttl: rule.max_ttl,
            limits: rule.limits.clone(),
            workspaces: rule.workspaces.clone(),
            cache,
        })
    }

    /// Marks a verified token used until it expires; a second use is
    /// refused.
    pub fn spend(&self, v: &Verified) -> Result<(), TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut used = self.used.locked();
        if used.len() >= USED_MAX {
            let keep = now.saturating_sub(self.leeway.as_secs());
            used.retain(|_, e| *e >= keep);
        }
        if used.contains_key(&v.once) {
            return Err(TokenError::Replayed);
        }
        if used.len() >= USED_MAX {
            return Err(TokenError::Invalid(
                "too many unexpired tokens in use; try again shortly".into(),
            ));
        }
        used.insert(v.once.clone(), v.exp + self.leeway.as_secs());
        Ok(())
    }

    /// Gives a spent token back (its job could not be made).
    pub fn unspend(&self, v: &Verified) {
        self.used.locked().remove(&v.once);
    }
}

fn keys_error(c: &IssuerConfig, why: String) -> TokenError {
    TokenError::Keys {
        issuer: c.issuer.clone(),
        why,
    }
}

fn read_jwks(path: &std::path::Path) -> Result<JwkSet, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a JWKS document: {e}", path.display()))
}

fn refusal(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::Audience(String::new()),
        K::InvalidSignature => TokenError::Signature,
        K::InvalidAlgorithm => TokenError::Algorithm("a mismatched key".into()),
        _ => TokenError::Invalid(e.to_string()),
    }
}

/// A claim as text (strings as they are, numbers and booleans written out).
fn claim(claims: &serde_json::Map<String, serde_json::Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

/// `*` matches any run of characters (none included); the rest literally.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn globs() {
        assert!(glob("acme/*", "acme/app"));
        assert!(glob("acme/*", "acme/"));
        assert!(!glob("acme/*", "acmex/app"));
        assert!(glob("refs/heads/main", "refs/heads/main"));
        assert!(!glob("refs/heads/main", "refs/heads/main2"));
        assert!(glob(
            "*:ref:refs/heads/*",
            "repo:acme/app:ref:refs/heads/dev"
        ));
        assert!(!glob("a*b*c", "acb"));
        assert!(glob("a*b*c", "abxc"));
        assert!(glob("*", ""));
    }

    fn cfg() -> TokenConfig {
        toml::from_str(
            r#"
enabled = true
[[issuers]]
issuer = "https://token.actions.githubusercontent.com"
jwks_file = "/etc/berth/github.json"
[[rules]]
name = "acme-main"
issuer = "https://token.actions.githubusercontent.com"
claims = { repository = "acme/*", ref = "refs/heads/main" }
labels = ["repository", "run_id"]
max_ttl = "1h"
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_section_is_checked_key_by_key() {
        cfg().validate().unwrap();
        TokenConfig::default().validate().unwrap();
        let bad = |f: &dyn Fn(&mut TokenConfig)| {
            let mut c = cfg();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(&|c| c.rules.clear()).0, "token");
        assert_eq!(bad(&|c| c.listen.set_port(2375)).0, "token.listen");
        assert!(
            bad(&|c| c.issuers[0].issuer = "http://x".into())
                .1
                .contains("https://")
        );
        assert!(
            bad(&|c| c.issuers[0].algorithms = vec!["HS256".into()])
                .1
                .contains("HS256")
        );
        assert!(
            bad(&|c| c.issuers[0].algorithms = vec!["none".into()])
                .1
                .contains("none")
        );
        assert!(
            bad(&|c| c.rules[0].claims.clear())
                .1
                .contains("at least one")
        );
        assert!(
            bad(&|c| c.rules[0].issuer = "https://other".into())
                .1
                .contains("not in")
        );
        assert!(
            bad(&|c| c.issuers[0].jwks_url = Some("https://x/jwks".into()))
                .1
                .contains("not both")
        );
        assert!(
            bad(&|c| c.rules[0].cache_write = true)
                .1
                .contains("needs a cache_key")
        );
        for (t, why) in [
            ("gh/{repository", "no '}'"),
            ("gh/repository}", "no '{'"),
            ("gh/{}", "not a claim"),
            ("gh/{a b}", "not a claim"),
            ("", "empty"),
        ] {
            let e = bad(&|c| c.rules[0].cache_key = Some(t.into()));
            assert!(e.1.contains(why), "{t:?}: {e:?}");
        }
    }

    #[test]
    fn a_rules_cache_key_is_made_of_the_tokens_claims() {
        let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
            serde_json::json!({"repository": "acme/app", "run": 7, "ctl": "a\nb"}),
        )
        .unwrap();
        let of = |t: &str| expand(t, |n| claim(&claims, n));
        assert_eq!(of("gh/{repository}").unwrap().as_str(), "gh/acme/app");
        assert_eq!(of("{repository}:{run}").unwrap().as_str(), "acme/app:7");
        assert_eq!(of("shared").unwrap().as_str(), "shared");
        assert!(of("gh/{ref}").unwrap_err().contains("no claim \"ref\""));
        // A claim cannot smuggle what the store refuses into a key.
        assert!(of("{ctl}").unwrap_err().contains("control"));
        let long = "x".repeat(300);
        assert!(
            expand("{r}", |_| Some(long.clone()))
                .unwrap_err()
                .contains("256")
        );
    }

    /// An issuer on loopback: its discovery document and key set over
    /// HTTPS (a certificate only `ca_file` trusts), counting key fetches.
    async fn issuer(jwks: serde_json::Value) -> (String, PathBuf, Arc<AtomicUsize>) {
        use hyper::body::Incoming;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "berth-oidc-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let fetches = Arc::new(AtomicUsize::new(0));
        let (b, f) = (base.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, b, f, jwks) = (acceptor.clone(), b.clone(), f.clone(), jwks.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let body = match req.uri().path() {
                            "/.well-known/openid-configuration" => {
                                serde_json::json!({ "issuer": b, "jwks_uri": format!("{b}/keys") })
                            }
                            _ => {
                                f.fetch_add(1, Ordering::SeqCst);
                                jwks.clone()
                            }
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(hyper::body::Bytes::from(
                                    body.to_string(),
                                )),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (base, ca, fetches)
    }

    #[tokio::test]
    async fn keys_come_from_the_issuers_discovery_document_and_unknown_keys_refetch_at_most_once_a_minute()
     {
        let kp = rcgen::KeyPair::generate().unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("k1".into());
        let (iss, ca, fetches) = issuer(serde_json::json!({ "keys": [jwk] })).await;
        let cfg: TokenConfig = toml::from_str(&format!(
            "enabled = true\n[[issuers]]\nissuer = {iss:?}\nca_file = {ca:?}\n\
             [[rules]]\nname = \"r\"\nissuer = {iss:?}\nclaims = {{ sub = \"system:serviceaccount:ci:*\" }}\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        let v = Verifier::new(&cfg).unwrap();
        v.refresh().await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let now = jsonwebtoken::get_current_timestamp();
        let mint = |kid: &str, sub: &str| {
            let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
            h.kid = Some(kid.into());
            let c = serde_json::json!({ "iss": iss, "aud": "berth", "sub": sub, "exp": now + 300 });
            jsonwebtoken::encode(&h, &c, &key).unwrap()
        };
        let ok = v
            .verify(&mint("k1", "system:serviceaccount:ci:runner"))
            .await
            .unwrap();
        assert_eq!(ok.grant.rule, "r");
        v.spend(&ok).unwrap();
        assert_eq!(v.spend(&ok), Err(TokenError::Replayed));
        v.unspend(&ok);
        v.spend(&ok).unwrap();
        let other = v.verify(&mint("k1", "system:serviceaccount:prod:x")).await;
        assert!(matches!(other, Err(TokenError::NoRule { .. })), "{other:?}");
        // An unknown kid: the issuer may have rotated; the set was fetched
        // under a minute ago, so it is not fetched again.
        let rotated = v
            .verify(&mint("k2", "system:serviceaccount:ci:runner"))
            .await;
        assert!(
            matches!(rotated, Err(TokenError::UnknownKey { .. })),
            "{rotated:?}"
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // An issuer the system's roots do not vouch for gets no keys.
        let mut untrusted = cfg.clone();
        untrusted.issuers[0].ca_file = None;
        let u = Verifier::new(&untrusted).unwrap();
        u.refresh().await;
        let e = u
            .verify(&mint("k1", "system:serviceaccount:ci:runner"))
            .await;
        assert!(matches!(e, Err(TokenError::Keys { .. })), "{e:?}");
        assert_eq!(e.unwrap_err().status(), 503);
    }

    #[test]
    fn statuses() {
        assert_eq!(TokenError::Expired.status(), 401);
        assert_eq!(TokenError::Replayed.status(), 401);
        let r = TokenError::NoRule {
            issuer: "i".into(),
            subject: "s".into(),
        };
        assert_eq!(r.status(), 403);
    }
}
