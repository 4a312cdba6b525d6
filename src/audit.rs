//! Per-job audit: one JSON line per request a job's certificate made (and
//! per lifecycle event: created, ended), in `STATE/audit/<job>.jsonl`
//! (root's, 0600). Kept after the job ends for `audit_retention`, each
//! file bounded by `audit_max_bytes` (records past the bound are counted,
//! not written). Read through `GET /berth/v1/jobs/{id}/audit` and
//! `berth job audit ID`.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::locks::Lock;

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Milliseconds since the epoch.
    pub ts_ms: u64,
    pub job: String,
    /// `job` (the job's certificate) or `admin`.
    pub identity: String,
    pub client: String,
    /// `request`, `created` or `ended`.
    pub event: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// Path and query.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    #[serde(default, skip_serializing_if = "is_zero16")]
    pub status: u16,
    #[serde(default)]
    pub bytes_to_daemon: u64,
    #[serde(default)]
    pub bytes_to_client: u64,
    #[serde(default)]
    pub duration_ms: u64,
    /// `allow`, `deny` (the policy) or `refused` (the job is not served).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `ended`: the CPU time of all the job's processes (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// `ended`: the most memory the job held at once (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
}

impl Record {
    /// A lifecycle event (`created`, `ended`) of `job`, now.
    pub fn event(job: &str, identity: &str, client: &str, event: &str, status: u16) -> Record {
        Record {
            ts_ms: now_ms(),
            job: job.into(),
            identity: identity.into(),
            client: client.into(),
            event: event.into(),
            method: String::new(),
            target: String::new(),
            status,
            bytes_to_daemon: 0,
            bytes_to_client: 0,
            duration_ms: 0,
            decision: String::new(),
            rule: None,
            cpu_ms: None,
            memory_peak_bytes: None,
        }
    }
}

fn is_zero16(v: &u16) -> bool {
    *v == 0
}

/// The stream of token exchanges, granted and refused (a refused token
/// has no job): `STATE/audit/tokens.jsonl`.
pub const TOKENS: &str = "tokens";

/// A name that has an audit file: a job id, or [`TOKENS`].
fn stream(name: &str) -> bool {
    crate::pki::valid_job_id(name) || name == TOKENS
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open audit file and what it holds.
struct Open {
    file: std::fs::File,
    bytes: u64,
}

/// Work for the writer thread, in order.
enum Op {
    Write(Box<Record>),
    Close(String),
    /// Answered once everything queued before it is written.
    Flush(mpsc::SyncSender<()>),
}

/// Records waiting for the writer; past this, new ones are counted as
/// dropped rather than held (a request never waits for the disk).
const QUEUE: usize = 8192;

/// How often the writer takes what is queued: a request only appends to a
/// list, and the writer wakes a few times a second, not once per request.
const WRITE_EVERY: Duration = Duration::from_millis(200);

/// The audit log. Requests hand their records to a writer thread of its
/// own; the request path neither serialises nor writes nor wakes anyone.
pub struct Audit {
    dir: PathBuf,
    retention: Duration,
    shared: Arc<Shared>,
}

struct Shared {
    open: Mutex<HashMap<String, Open>>,
    queue: Mutex<Queue>,
    wake: std::sync::Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    closed: bool,
}

impl Audit {
    pub fn new(dir: &Path, retention: Duration, max_bytes: u64) -> Result<Audit, AuditError> {
        let io = |source| AuditError::Io {
            what: "create",
            path: dir.into(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let shared = Arc::new(Shared {
            open: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            wake: std::sync::Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let (d, sh) = (dir.to_path_buf(), shared.clone());
        std::thread::Builder::new()
            .name("berth-audit".into())
            .spawn(move || writer(&d, max_bytes, &sh))
            .map_err(io)?;
        Ok(Audit {
            dir: dir.into(),
            retention,
            shared,
        })
    }

    fn path(&self, job: &str) -> PathBuf {
        self.dir.join(format!("{job}.jsonl"))
    }

    /// Records that did not fit their file's bound, the queue, or the disk.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn push(&self, op: Op, wake: bool) -> bool {
        let mut q = self.shared.queue.locked();
        if q.ops.len() >= QUEUE && matches!(op, Op::Write(_)) {
            return false;
        }
        q.ops.push(op);
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        true
    }

    /// Queues `rec` for its job's file.
    pub fn record(&self, rec: Record) {
        if !stream(&rec.job) {
            return;
        }
        if !self.push(Op::Write(Box::new(rec)), false) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The job ended: its file is closed once its records are written (and
    /// kept for the retention).
    pub fn close(&self, job: &str) {
        self.push(Op::Close(job.into()), false);
    }

    /// Waits until every record queued so far is written.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.push(Op::Flush(tx), true);
        let _ = rx.recv_timeout(Duration::from_secs(10));
    }

    /// The job's records as written (JSON lines), if it has any.
    pub fn read(&self, job: &str) -> Option<Vec<u8>> {
        if !stream(job) {
            return None;
        }
        self.flush();
        std::fs::read(self.path(job)).ok()
    }

    /// Removes the files of jobs that ended longer ago than the retention
    /// (last written before it, and not open).
    pub fn expire(&self) -> usize {
        self.flush();
        let open: Vec<String> = self.shared.open.locked().keys().cloned().collect();
        let cutoff = SystemTime::now()
            .checked_sub(self.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(job) = name.strip_suffix(".jsonl") else {
                continue;
            };
            if open.iter().any(|o| o == job) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // What is queued is written; then the writer ends.
        self.flush();
        self.shared.queue.locked().closed = true;
        self.shared.wake.notify_one();
    }
}

/// The writer thread: takes what is queued every `WRITE_EVERY` (at once
/// for a flush), one write of one line per record, files kept open while
/// their job lives.
fn writer(dir: &Path, max_bytes: u64, shared: &Shared) {
    loop {
        let (ops, closed) = {
            let q = shared.queue.locked();
            let (mut q, _) = shared
                .wake
                .wait_timeout(q, WRITE_EVERY)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (std::mem::take(&mut q.ops), q.closed)
        };
        for op in ops {
            match op {
                Op::Write(rec) => {
                    if !append(dir, max_bytes, shared, &rec) {
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Op::Close(job) => {
                    shared.open.locked().remove(&job);
                }
                Op::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
        if closed {
            return;
        }
    }
}

fn append(dir: &Path, max_bytes: u64, shared: &Shared, rec: &Record) -> bool {
    let Ok(mut line) = serde_json::to_vec(rec) else {
        return false;
    };
    line.push(b'\n');
    let mut open = shared.open.locked();
    if !open.contains_key(&rec.job) {
        let path = dir.join(format!("{}.jsonl", rec.job));
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                open.insert(rec.job.clone(), Open { file, bytes });
            }
            Err(e) => {
                tracing::warn!(job = %rec.job, path = %path.display(), error = %e, "cannot open the job's audit file");
                return false;
            }
        }
    }
    let Some(f) = open.get_mut(&rec.job) else {
        return false;
    };
    if f.bytes + line.len() as u64 > max_bytes || f.file.write_all(&line).is_err() {
        return false;
    }
    f.bytes += line.len() as u64;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(job: &str, n: u16) -> Record {
        Record {
            ts_ms: now_ms(),
            job: job.into(),
            identity: "job".into(),
            client: "127.0.0.1:5000".into(),
            event: "request".into(),
            method: "GET".into(),
            target: "/v1.41/containers/json?all=1".into(),
            status: n,
            bytes_to_daemon: 0,
            bytes_to_client: 3,
            duration_ms: 1,
            decision: "allow".into(),
            rule: None,
            cpu_ms: None,
            memory_peak_bytes: None,
        }
    }

    #[test]
    fn records_are_lines_of_json_bounded_per_job_and_expired_after_the_retention() {
        let dir = std::env::temp_dir().join(format!("berth-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Audit::new(&dir, Duration::from_secs(3600), 600).unwrap();
        a.record(rec("aaaaaaaaaaaa", 200));
        a.record(rec("aaaaaaaaaaaa", 404));
        a.record(rec("bbbbbbbbbbbb", 200));
        // Not a job id: never a path.
        a.record(rec("../../etc/x", 200));
        let text = String::from_utf8(a.read("aaaaaaaaaaaa").unwrap()).unwrap();
        let got: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].status, 404);
        assert_eq!(got[0], rec("aaaaaaaaaaaa", 200).clone_with_ts(got[0].ts_ms));
        assert!(a.read("../../etc/x").is_none());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("aaaaaaaaaaaa.jsonl"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // The bound: whole records only, the rest counted.
        for _ in 0..10 {
            a.record(rec("aaaaaaaaaaaa", 200));
        }
        a.flush();
        let len = std::fs::metadata(dir.join("aaaaaaaaaaaa.jsonl"))
            .unwrap()
            .len();
        assert!(len <= 600, "{len}");
        assert!(a.dropped() > 0);
        let text = String::from_utf8(a.read("aaaaaaaaaaaa").unwrap()).unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Record>(l).is_ok())
        );
        // Retention: an ended job's file goes once it is older; an open one
        // stays.
        a.close("aaaaaaaaaaaa");
        let old = SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(dir.join("aaaaaaaaaaaa.jsonl"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(dir.join("bbbbbbbbbbbb.jsonl"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(a.expire(), 1);
        assert!(a.read("aaaaaaaaaaaa").is_none());
        assert!(a.read("bbbbbbbbbbbb").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    impl Record {
        fn clone_with_ts(mut self, ts: u64) -> Record {
            self.ts_ms = ts;
            self
        }
    }
}
