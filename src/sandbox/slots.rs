//! Job slots: slot n owns host ids `uid_base + n*65536 ..+65536` and the n-th
//! /30 of the address pool. A slot is claimed by creating `slots/<n>` with
//! O_EXCL, so two jobs (even of two agents sharing a state dir) never get the
//! same range. Ranges that overlap /etc/subuid or /etc/subgid are never used.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::config::{RANGE_SIZE, SandboxConfig};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "no free job slot: all {total} slots are in use or their uid ranges overlap \
         /etc/subuid or /etc/subgid; raise {bound} in the configuration or end some jobs"
    )]
    Exhausted { total: u32, bound: &'static str },
    #[error("cannot read {path}: {source}")]
    ReadIds {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {why}")]
    ParseIds {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("cannot claim slot in {path}: {source}")]
    Claim {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A range of host ids `[start, start+len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u64,
    pub len: u64,
}

impl IdRange {
    fn overlaps(&self, other: &IdRange) -> bool {
        self.start < other.start + other.len && other.start < self.start + self.len
    }
}

/// Parses /etc/subuid-style text (`name:start:count`). A missing file means
/// no entries.
pub fn read_subid(path: &Path) -> Result<Vec<IdRange>, SlotError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SlotError::ReadIds {
                path: path.into(),
                source,
            });
        }
    };
    parse_subid(&text).map_err(|(line, why)| SlotError::ParseIds {
        path: path.into(),
        line,
        why,
    })
}

fn parse_subid(text: &str) -> Result<Vec<IdRange>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(':').collect();
        if f.len() != 3 {
            return Err((i + 1, format!("expected name:start:count, got {line:?}")));
        }
        let start = f[1]
            .parse::<u64>()
            .map_err(|e| (i + 1, format!("start {:?}: {e}", f[1])))?;
        let len = f[2]
            .parse::<u64>()
            .map_err(|e| (i + 1, format!("count {:?}: {e}", f[2])))?;
        out.push(IdRange { start, len });
    }
    Ok(out)
}

/// Host id range of slot `n`.
pub fn range_of(cfg: &SandboxConfig, slot: u32) -> IdRange {
    IdRange {
        start: u64::from(cfg.uid_base) + u64::from(slot) * u64::from(RANGE_SIZE),
        len: u64::from(RANGE_SIZE),
    }
}

/// Slots whose range touches host id 0 or any reserved range.
pub fn usable_slots(cfg: &SandboxConfig, reserved: &[IdRange]) -> Vec<u32> {
    (0..cfg.slots())
        .filter(|&n| {
            let r = range_of(cfg, n);
            r.start > 0 && !reserved.iter().any(|x| x.overlaps(&r))
        })
        .collect()
}

pub fn slots_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("slots")
}

/// The host's own id ranges (`/etc/subuid`, `/etc/subgid`).
fn reserved(cfg: &SandboxConfig) -> Result<Vec<IdRange>, SlotError> {
    let mut reserved = read_subid(&cfg.subuid_file)?;
    reserved.extend(read_subid(&cfg.subgid_file)?);
    Ok(reserved)
}

/// How many slots jobs may ever hold (see [`usable_slots`]).
pub fn usable(cfg: &SandboxConfig) -> Result<usize, SlotError> {
    Ok(usable_slots(cfg, &reserved(cfg)?).len())
}

/// Claims the first free usable slot for `job_id`.
pub fn claim(cfg: &SandboxConfig, job_id: &str) -> Result<u32, SlotError> {
    let reserved = reserved(cfg)?;
    let dir = slots_dir(&cfg.state_dir);
    std::fs::create_dir_all(&dir).map_err(|source| SlotError::Claim {
        path: dir.clone(),
        source,
    })?;
    for n in usable_slots(cfg, &reserved) {
        let path = dir.join(n.to_string());
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(job_id.as_bytes())
                    .map_err(|source| SlotError::Claim { path, source })?;
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(SlotError::Claim { path, source }),
        }
    }
    Err(SlotError::Exhausted {
        total: cfg.slots(),
        bound: cfg.slots_bound(),
    })
}

/// Usable slots that nothing claims now.
pub fn free(cfg: &SandboxConfig) -> Result<usize, SlotError> {
    let dir = slots_dir(&cfg.state_dir);
    Ok(usable_slots(cfg, &reserved(cfg)?)
        .into_iter()
        .filter(|n| !dir.join(n.to_string()).exists())
        .count())
}

/// Releases `slot` if it is still claimed by `job_id`. Idempotent.
pub fn release(state_dir: &Path, slot: u32, job_id: &str) -> std::io::Result<()> {
    let path = slots_dir(state_dir).join(slot.to_string());
    match std::fs::read_to_string(&path) {
        Ok(owner) if owner == job_id => std::fs::remove_file(&path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Claims whose job no longer has a record (left by a crash between the
/// claim and the record write).
pub fn orphan_claims(state_dir: &Path, live: &dyn Fn(&str) -> bool) -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir(slots_dir(state_dir)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let n: u32 = e.file_name().to_str()?.parse().ok()?;
            let owner = std::fs::read_to_string(e.path()).ok()?;
            (!live(&owner)).then_some((n, owner))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> SandboxConfig {
        SandboxConfig {
            state_dir: dir.into(),
            uid_base: 100_000,
            uid_ranges: 4,
            subuid_file: dir.join("subuid"),
            subgid_file: dir.join("subgid"),
            ..Default::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-slots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parses_subid_and_rejects_garbage() {
        let r = parse_subid("# c\nalice:100000:65536\n\nbob:165536:65536\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[1],
            IdRange {
                start: 165536,
                len: 65536
            }
        );
        assert_eq!(parse_subid("alice:x:1").unwrap_err().0, 1);
        assert_eq!(parse_subid("ok:1:1\nbad").unwrap_err().0, 2);
    }

    #[test]
    fn skips_ranges_reserved_by_subuid_and_subgid() {
        let d = tmp("reserved");
        let c = cfg(&d);
        // Overlaps slot 0 by one id; slot 2 by its whole range through subgid.
        std::fs::write(&c.subuid_file, "alice:165535:1\n").unwrap();
        std::fs::write(&c.subgid_file, "bob:231072:65536\n").unwrap();
        assert_eq!(claim(&c, "a").unwrap(), 1);
        assert_eq!(claim(&c, "b").unwrap(), 3);
        let e = claim(&c, "c").unwrap_err();
        assert!(e.to_string().contains("no free job slot"), "{e}");
        release(&d, 1, "a").unwrap();
        assert_eq!(claim(&c, "c").unwrap(), 1);
    }

    #[test]
    fn never_hands_out_uid_zero() {
        let c = SandboxConfig {
            uid_base: 0,
            uid_ranges: 2,
            ..Default::default()
        };
        assert_eq!(usable_slots(&c, &[]), vec![1]);
    }

    #[test]
    fn release_only_by_owner_and_idempotent() {
        let d = tmp("release");
        let c = cfg(&d);
        let n = claim(&c, "owner").unwrap();
        release(&d, n, "intruder").unwrap();
        assert!(slots_dir(&d).join(n.to_string()).exists());
        release(&d, n, "owner").unwrap();
        release(&d, n, "owner").unwrap();
        assert!(!slots_dir(&d).join(n.to_string()).exists());
    }

    #[test]
    fn concurrent_claims_are_distinct() {
        let d = tmp("concurrent");
        let c = std::sync::Arc::new(SandboxConfig {
            uid_ranges: 64,
            ..cfg(&d)
        });
        let hs: Vec<_> = (0..16)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || claim(&c, &format!("j{i}")).unwrap())
            })
            .collect();
        let mut got: Vec<u32> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 16);
    }
}
