//! Client of the job API, for the `berth job` commands: reqwest over the same
//! mutual TLS as every other client, with the admin bundle.

use std::path::{Path, PathBuf};

use crate::frontdoor::api::Created;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot read the admin bundle {path}: {source} (run `berth serve` once, or pass --certs-dir)"
    )]
    Bundle {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the agent's CA certificate {path}: {source} (pass --ca)")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad admin bundle: {0}")]
    BadBundle(reqwest::Error),
    #[error("cannot reach the agent at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("the agent answered {status}: {message}")]
    Api { status: u16, message: String },
}

pub struct AgentClient {
    http: reqwest::Client,
    base: String,
    endpoint: String,
}

impl AgentClient {
    /// `endpoint` is HOST:PORT; the admin bundle is `<certs_dir>/admin/`.
    pub fn new(endpoint: &str, certs_dir: &Path) -> Result<AgentClient, ClientError> {
        AgentClient::with_bundle(endpoint, &certs_dir.join("admin"))
    }

    /// `dir` holds a bundle: `ca.pem`, `cert.pem`, `key.pem` (the admin's,
    /// or a job's, as `DOCKER_CERT_PATH` names it).
    pub fn with_bundle(endpoint: &str, dir: &Path) -> Result<AgentClient, ClientError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read(&path).map_err(|source| ClientError::Bundle { path, source })
        };
        let (ca, mut cert, key) = (read("ca.pem")?, read("cert.pem")?, read("key.pem")?);
        cert.extend_from_slice(&key);
        let identity = reqwest::Identity::from_pem(&cert).map_err(ClientError::BadBundle)?;
        AgentClient::build(endpoint, &ca, Some(identity))
    }

    /// Trusts the agent's CA only (`ca`, PEM); `identity`: the client
    /// certificate, if one is shown.
    fn build(
        endpoint: &str,
        ca: &[u8],
        identity: Option<reqwest::Identity>,
    ) -> Result<AgentClient, ClientError> {
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca).map_err(ClientError::BadBundle)?,
            );
        if let Some(id) = identity {
            http = http.identity(id);
        }
        Ok(AgentClient {
            http: http.build().map_err(ClientError::BadBundle)?,
            base: format!("https://{endpoint}/berth/v1"),
            endpoint: endpoint.to_string(),
        })
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = rb.send().await.map_err(|source| ClientError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(ClientError::Api { status, message })
    }

    pub async fn create(&self, spec: &serde_json::Value) -> Result<Created, ClientError> {
        self.post_json("jobs", spec).await
    }

    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        self.json(self.http.post(format!("{}/{path}", self.base)).json(body))
            .await
    }

    pub async fn list(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        self.get_json("jobs").await
    }

    /// The agent's project caches (`GET /berth/v1/caches`).
    pub async fn caches(&self) -> Result<Vec<crate::sandbox::fs::caches::KeyInfo>, ClientError> {
        self.get_json("caches").await
    }

    /// Removes a project cache (`DELETE /berth/v1/caches?key=KEY`).
    pub async fn remove_cache(&self, key: &str) -> Result<(), ClientError> {
        let req = self
            .http
            .delete(format!("{}/caches", self.base))
            .query(&[("key", key)]);
        self.send(req).await?;
        Ok(())
    }

    /// The agent's warm pool (`GET /berth/v1/pool`).
    pub async fn pool(&self) -> Result<serde_json::Value, ClientError> {
        self.get_json("pool").await
    }

    /// Whether the agent takes another job (`GET /berth/v1/capacity`).
    pub async fn capacity(&self) -> Result<crate::jobs::Capacity, ClientError> {
        self.get_json("capacity").await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.http.get(format!("{}/{path}", self.base)))
            .await
    }

    /// Sends `rb` and reads its JSON answer.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(rb)
            .await?
            .json()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: self.endpoint.clone(),
                source,
            })
    }

    /// Job `id`'s audit records, JSON lines (`GET /berth/v1/jobs/{id}/audit`).
    pub async fn audit(&self, id: &str) -> Result<String, ClientError> {
        let r = self
            .send(self.http.get(format!("{}/jobs/{id}/audit", self.base)))
            .await?;
        r.text().await.map_err(|source| ClientError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        })
    }

    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.delete_with(id, None).await
    }

    /// Ends job `id`, saying how it ended (`success`, `failure`): a job
    /// with a cache key commits on it.
    pub async fn delete_with(&self, id: &str, outcome: Option<&str>) -> Result<(), ClientError> {
        let mut req = self.http.delete(format!("{}/jobs/{id}", self.base));
        if let Some(o) = outcome {
            req = req.query(&[("outcome", o)]);
        }
        self.send(req).await?;
        Ok(())
    }

    /// With a job's bundle: ends that job (`DELETE /berth/v1/job`), saying
    /// how it ended; answers once the job is gone.
    pub async fn end_own_job(&self, outcome: Option<&str>) -> Result<(), ClientError> {
        let mut req = self.http.delete(format!("{}/job", self.base));
        if let Some(o) = outcome {
            req = req.query(&[("outcome", o)]);
        }
        self.send(req).await?;
        Ok(())
    }
}

/// The token exchange (`POST /berth/v1/token`): no client certificate, the
/// server checked against the agent's CA (`ca`, a PEM file).
pub async fn exchange(
    endpoint: &str,
    ca: &Path,
    request: &serde_json::Value,
) -> Result<Created, ClientError> {
    let pem = std::fs::read(ca).map_err(|source| ClientError::Ca {
        path: ca.to_path_buf(),
        source,
    })?;
    AgentClient::build(endpoint, &pem, None)?
        .post_json("token", request)
        .await
}
