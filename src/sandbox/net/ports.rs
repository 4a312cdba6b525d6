//! Published ports: the host ports a job's containers publish come from a
//! block of its own, forwarded from every address of the agent's host (the
//! rules are in `net`). This is the block's type, written `"FIRST-LAST"`.

use serde::{Deserialize, Serialize};

/// An inclusive range of ports, written `"FIRST-LAST"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A bad range, or a pool (`port_pool`) that cannot be carved into blocks
/// of `ports_per_job`.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("{text:?}: expected FIRST-LAST, e.g. \"20000-29999\"")]
    NotARange { text: String },
    #[error("{text:?}: {port:?} is not a port (1-65535)")]
    NotAPort { text: String, port: String },
    #[error("{text:?}: the last port is below the first")]
    Reversed { text: String },
    #[error("port_pool: {pool} starts below 1024, among ports host services listen on")]
    PoolBelow1024 { pool: PortRange },
    #[error(
        "ports_per_job: {per_job} is too few for a job's own connections; use at least 8, or 0 to publish nothing"
    )]
    TooFewPerJob { per_job: u16 },
    #[error("ports_per_job: {per_job} is more than port_pool {pool} holds")]
    MoreThanPool { per_job: u16, pool: PortRange },
}

impl PortRange {
    pub fn count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Checks this range as the pool carved into blocks of `per_job` ports
    /// (0: jobs publish nothing at the agent's addresses).
    pub fn check_pool(&self, per_job: u16) -> Result<(), PortsError> {
        if self.first < 1024 {
            return Err(PortsError::PoolBelow1024 { pool: *self });
        }
        if per_job != 0 {
            if per_job < 8 {
                return Err(PortsError::TooFewPerJob { per_job });
            }
            if u32::from(per_job) > self.count() {
                return Err(PortsError::MoreThanPool {
                    per_job,
                    pool: *self,
                });
            }
        }
        Ok(())
    }

    /// Block `n` of this pool carved into blocks of `per_job` ports, if the
    /// pool holds it (and jobs publish any).
    pub fn block(&self, per_job: u16, n: u32) -> Option<PortRange> {
        if per_job == 0 {
            return None;
        }
        let first = u32::from(self.first) + n * u32::from(per_job);
        let last = first + u32::from(per_job) - 1;
        (last <= u32::from(self.last)).then_some(PortRange {
            first: first as u16,
            last: last as u16,
        })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = PortsError;
    fn from_str(s: &str) -> Result<Self, PortsError> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| PortsError::NotARange { text: s.into() })?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| PortsError::NotAPort {
                    text: s.into(),
                    port: p.into(),
                })
        };
        let (first, last) = (port(a)?, port(b)?);
        if last < first {
            return Err(PortsError::Reversed { text: s.into() });
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_with_errors_that_say_why() {
        assert_eq!(
            "20000-29999".parse::<PortRange>().unwrap(),
            PortRange {
                first: 20000,
                last: 29999
            }
        );
        for bad in ["20000", "0-10", "30000-20000", "1-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert_eq!(
            "1-70000".parse::<PortRange>().unwrap_err().to_string(),
            "\"1-70000\": \"70000\" is not a port (1-65535)"
        );
    }
}
