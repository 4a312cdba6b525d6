//! The on-disk record of a job: written before anything of the job exists on
//! the host and removed last, so a crash at any point leaves enough for the
//! next start to tear the job down.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cgroup::JobCgroup;
use super::net::ports::PortRange;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub slot: u32,
    /// First host uid (and gid) of the job's range.
    pub host_id: u32,
    pub host_ip: Ipv4Addr,
    pub job_ip: Ipv4Addr,
    /// The host ports forwarded to the job (what its containers publish).
    #[serde(default)]
    pub ports: Option<PortRange>,
    pub cgroup: Option<JobCgroup>,
    /// Stage-1 helper that waits for the job's init (a direct child of the
    /// agent).
    pub monitor_pid: Option<u32>,
    /// pid 1 of the job's pid namespace, as seen from the host.
    pub init_pid: Option<u32>,
    pub created_unix: u64,
    /// The project cache the job started from and may commit to.
    #[serde(default)]
    pub cache_key: Option<super::fs::caches::Key>,
    /// The job's disk image where it is not `<job>/disk.img`: a keyed job's
    /// lives in the project caches' pool.
    #[serde(default)]
    pub disk_image: Option<std::path::PathBuf>,
    /// Whether the job's binfmt_misc instance holds the host's emulators.
    #[serde(default = "emulation_default")]
    pub emulation: bool,
}

/// Records written before jobs could go without emulators had them.
fn emulation_default() -> bool {
    true
}

pub fn jobs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jobs")
}

pub fn job_dir(state_dir: &Path, id: &str) -> PathBuf {
    jobs_dir(state_dir).join(id)
}

fn record_path(state_dir: &Path, id: &str) -> PathBuf {
    job_dir(state_dir, id).join("record.json")
}

impl JobRecord {
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&record_path(state_dir, &self.id), &json, 0o600)
    }

    pub fn load(state_dir: &Path, id: &str) -> std::io::Result<JobRecord> {
        let bytes = std::fs::read(record_path(state_dir, id))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    /// Ids of every job that has a directory in the state dir.
    pub fn list_ids(state_dir: &Path) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(jobs_dir(state_dir)) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_record_from_before_per_job_emulation_had_it() {
        let old = r#"{"id":"abc","slot":1,"host_id":1000,"host_ip":"10.0.0.1","job_ip":"10.0.0.2",
            "cgroup":null,"monitor_pid":null,"init_pid":null,"created_unix":1}"#;
        let r: JobRecord = serde_json::from_str(old).unwrap();
        assert!(r.emulation);
    }

    #[test]
    fn round_trip_and_mode() {
        let d = std::env::temp_dir().join(format!("berth-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(job_dir(&d, "abc")).unwrap();
        let r = JobRecord {
            id: "abc".into(),
            slot: 3,
            host_id: 1_000_196_608,
            host_ip: Ipv4Addr::new(10, 0, 0, 1),
            job_ip: Ipv4Addr::new(10, 0, 0, 2),
            ports: None,
            cgroup: None,
            monitor_pid: Some(42),
            init_pid: None,
            created_unix: 1,
            cache_key: Some(super::super::fs::caches::Key::new("org/app").unwrap()),
            disk_image: None,
            emulation: false,
        };
        r.save(&d).unwrap();
        let back = JobRecord::load(&d, "abc").unwrap();
        assert_eq!(back.slot, 3);
        assert_eq!(back.monitor_pid, Some(42));
        assert_eq!(back.cache_key, r.cache_key);
        assert!(!back.emulation);
        let mode = std::fs::metadata(record_path(&d, "abc"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(JobRecord::list_ids(&d), vec!["abc".to_string()]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
