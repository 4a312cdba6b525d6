//! Which identity may send which request: a pure function, no I/O.
//! A job certificate opens its own job's Docker API (every method and path)
//! and nothing of the agent's; the admin certificate opens the job API only.

use hyper::{Method, StatusCode};

use crate::proxy::strip_version;

pub const API_PREFIX: &str = "/berth/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        rule: &'static str,
        status: StatusCode,
        message: &'static str,
    },
}

/// A request from a job identity (already routed to its own job).
pub fn decide_job(_method: &Method, path: &str) -> Decision {
    if path.starts_with(API_PREFIX) || strip_version(path).starts_with(API_PREFIX) {
        return Decision::Deny {
            rule: "job-api-needs-admin",
            status: StatusCode::FORBIDDEN,
            message: "berth: the job API needs the admin certificate",
        };
    }
    Decision::Allow
}

/// A request from the admin identity.
pub fn decide_admin(_method: &Method, path: &str) -> Decision {
    if path == "/berth/v1/jobs"
        || path.starts_with("/berth/v1/jobs/")
        || path == "/berth/v1/pool"
        || path == "/berth/v1/metrics"
    {
        return Decision::Allow;
    }
    if path.starts_with(API_PREFIX) {
        return Decision::Deny {
            rule: "admin-unknown-path",
            status: StatusCode::NOT_FOUND,
            message: "berth: no such job API path (see /berth/v1/jobs)",
        };
    }
    Decision::Deny {
        rule: "admin-opens-no-daemon",
        status: StatusCode::FORBIDDEN,
        message: "berth: the admin certificate opens the job API only; use a job's certificate for its Docker API",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                assert_eq!(decide_job(&m, p), Decision::Allow, "{m} {p}");
            }
            for p in ["/berth/v1/jobs", "/v1.41/berth/v1/jobs", "/berth/"] {
                assert!(
                    matches!(decide_job(&m, p), Decision::Deny { .. }),
                    "{m} {p}"
                );
            }
        }
    }

    #[test]
    fn admin_reaches_the_job_api_only() {
        assert_eq!(
            decide_admin(&Method::POST, "/berth/v1/jobs"),
            Decision::Allow
        );
        assert_eq!(
            decide_admin(&Method::DELETE, "/berth/v1/jobs/0123456789ab"),
            Decision::Allow
        );
        for p in [
            "/_ping",
            "/v1.41/containers/json",
            "/berth/v2/x",
            "/berth/v1/jobsx",
        ] {
            assert!(
                matches!(decide_admin(&Method::GET, p), Decision::Deny { .. }),
                "{p}"
            );
        }
    }
}
