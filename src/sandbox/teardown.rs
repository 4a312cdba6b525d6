//! Ending jobs, whatever state they put themselves in: a job's processes
//! killed (thawed first where frozen), then every trace of it removed from
//! the host (cgroups, rules, link, disk, directories, last the record and the
//! slot claim). A teardown that cannot finish keeps the job in the books as
//! `teardown-failed` and is retried; recovery of what an earlier agent left;
//! shutdown.

use crate::locks::Lock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::cgroup::Usage;
use super::child::HIDDEN_SUBCOMMAND;
use super::fs::disk;
use super::{
    Engine, JobRecord, Sandbox, SandboxError, Status, Stuck, Teardown, backoff, io, net, ping,
    record, slots, start_err, sys,
};

/// How long a teardown waits for the job's last tasks to die (tasks in
/// uninterruptible sleep die when their I/O returns) before it reports the
/// job as `teardown-failed` and leaves it for a retry.
const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// Longest wait between two retries of a failed teardown.
const RETRY_CAP: Duration = Duration::from_secs(300);

impl Engine {
    /// Ends a job: an optional grace (`stop_grace`) for its containers, then
    /// SIGKILL of everything of it, then removal of every trace on the host.
    /// Idempotent; works for jobs of this process and for records left by an
    /// earlier one. On failure the job stays listed (`Status::TeardownFailed`,
    /// [`Engine::stuck`]) and its record stays on disk.
    pub async fn teardown(&self, id: &str) -> Result<Teardown, SandboxError> {
        let t0 = Instant::now();
        let live = self.get(id);
        let rec = match &live {
            Some(sb) => JobRecord::load(&self.cfg.state_dir, id).unwrap_or_else(|_| sb.record()),
            None => JobRecord::load(&self.cfg.state_dir, id)
                .map_err(|_| SandboxError::NoSuchJob(id.into()))?,
        };
        match self.end(live.as_ref(), &rec).await {
            Ok((killed, usage)) => {
                self.stuck.locked().remove(id);
                self.release_workspaces(id);
                if let Some(sb) = self.jobs.locked().remove(id) {
                    sb.inner.status.send_replace(Status::Stopped);
                }
                let took = t0.elapsed();
                tracing::info!(
                    job = %id,
                    took_ms = took.as_millis() as u64,
                    killed,
                    cpu_ms = usage.map(|u| u.cpu.as_millis() as u64),
                    memory_peak = usage.and_then(|u| u.memory_peak),
                    "job torn down"
                );
                Ok(Teardown {
                    id: id.into(),
                    took,
                    killed,
                    usage,
                })
            }
            Err(e) => {
                let why = e.to_string();
                let attempts = {
                    let mut stuck = self.stuck.locked();
                    let attempts = stuck.get(id).map_or(0, |s| s.attempts) + 1;
                    let wait = backoff(attempts, RETRY_CAP);
                    stuck.insert(
                        id.into(),
                        Stuck {
                            why: why.clone(),
                            attempts,
                            created_unix: rec.created_unix,
                            next_try: Instant::now() + wait,
                        },
                    );
                    attempts
                };
                if let Some(sb) = &live {
                    sb.inner
                        .status
                        .send_replace(Status::TeardownFailed(why.clone()));
                }
                tracing::error!(job = %id, error = %why, attempts, "teardown failed; the job stays listed and is retried");
                Err(SandboxError::TeardownFailed {
                    id: id.into(),
                    source: Box::new(e),
                })
            }
        }
    }

    /// Ends a keyed job and makes its disk its key's new project cache:
    /// containers, unlabelled volumes and unused networks shed, dockerd
    /// stopped, the job torn down, then its disk, once no mount of it is
    /// left, committed whole. A job whose disk cannot be committed is torn
    /// down all the same, and the key keeps its state.
    pub async fn teardown_committing(
        &self,
        id: &str,
    ) -> Result<(Teardown, super::fs::caches::KeyInfo), SandboxError> {
        let sb = self
            .get(id)
            .ok_or_else(|| SandboxError::NoSuchJob(id.into()))?;
        let rec = sb.record();
        let (Some(key), Some(image), Some(pool)) = (
            rec.cache_key.clone(),
            rec.disk_image.clone(),
            self.host.project_caches.as_ref(),
        ) else {
            self.teardown(id).await?;
            return Err(SandboxError::Prerequisite(format!(
                "job {id} has no cache key: nothing to commit"
            )));
        };
        let named_need_all = self.host.engine.dockerd.version.major >= 23;
        let shed = ping::shed_for_commit(&sb.socket(), named_need_all).await;
        // dockerd stopped by its own hand, its stores complete on disk.
        if let Some(init) = rec.init_pid {
            sys::kill(init as i32, Signal::SIGTERM).ok();
        }
        let mut exited = sb.inner.exited.clone();
        let stopped =
            tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| e.is_some()))
                .await
                .is_ok();
        // Out of the teardown's way, which removes the job's image.
        let kept = image.with_extension("commit");
        let moved = std::fs::rename(&image, &kept);
        let torn = self.teardown(id).await?;
        let result = async {
            shed.map_err(|e| start_err(id, format!("before the commit: {e}")))?;
            if !stopped {
                return Err(start_err(id, "dockerd did not stop within 30 s"));
            }
            moved.map_err(io("cannot move", &image))?;
            released(&kept).await.map_err(|e| start_err(id, e))?;
            let (info, evicted) = pool.commit(&key, &kept, id).map_err(|e| start_err(id, e))?;
            for k in &evicted {
                tracing::info!(key = %k.key, bytes = k.bytes, "project cache evicted (least recently used)");
            }
            Ok(info)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&kept);
        }
        let info = result?;
        tracing::info!(job = %id, key = %info.key, bytes = info.bytes, "project cache committed");
        Ok((torn, info))
    }

    /// The steps of a teardown, in order. True when something was killed;
    /// what the job used, read once its last process is gone.
    async fn end(
        &self,
        live: Option<&Sandbox>,
        rec: &JobRecord,
    ) -> Result<(bool, Option<Usage>), SandboxError> {
        if let Some(sb) = live {
            sb.inner.status.send_modify(|s| {
                if !matches!(s, Status::Stopped) {
                    *s = Status::Stopping
                }
            });
            self.grace(sb, rec).await;
        }
        let killed = self.kill(live, rec).await?;
        let mut held = None;
        if let Some(sb) = live {
            // The helper (the agent's child) is reaped by its watcher.
            let mut exited = sb.inner.exited.clone();
            let _ = tokio::time::timeout(KILL_PATIENCE, exited.wait_for(|e| e.is_some())).await;
            sb.inner.relay.locked().take();
            // The namespaces held for it (the helper's, with the mounts of
            // its drop point): nothing of the job is left to enter.
            held = sb.inner.mounts.locked().take();
        }
        let usage = rec.cgroup.as_ref().and_then(|cg| cg.usage());
        self.remove_traces(rec, held).await?;
        Ok((killed, usage))
    }

    /// With `stop_grace` set and containers running, asks dockerd to stop
    /// them (SIGTERM to the job's init, forwarded) and waits up to the grace.
    async fn grace(&self, sb: &Sandbox, rec: &JobRecord) {
        let grace = self.cfg.stop_grace;
        let mut exited = sb.inner.exited.clone();
        if grace.is_zero() || exited.borrow().is_some() {
            return;
        }
        if ping::running_containers(&sb.socket())
            .await
            .is_none_or(|n| n == 0)
        {
            return;
        }
        if let Some(init) = rec.init_pid {
            sys::kill(init as i32, Signal::SIGTERM).ok();
        }
        let _ = tokio::time::timeout(grace, exited.wait_for(|e| e.is_some())).await;
    }

    /// SIGKILL of the job's init (its pid namespace goes with it) and of
    /// everything left in its cgroups, frozen tasks included; waits until
    /// none is left.
    async fn kill(&self, live: Option<&Sandbox>, rec: &JobRecord) -> Result<bool, SandboxError> {
        let alive = match live {
            Some(sb) => sb.inner.exited.borrow().is_none(),
            None => rec.init_pid.is_some_and(|p| is_job_process(p, &rec.id)),
        };
        if alive && let Some(init) = rec.init_pid {
            sys::kill(init as i32, Signal::SIGKILL).ok();
        }
        let Some(cg) = rec.cgroup.clone() else {
            return Ok(alive);
        };
        let swept = tokio::task::spawn_blocking(move || cg.kill_all(KILL_PATIENCE))
            .await
            .map_err(|e| start_err(&rec.id, e))?;
        swept?;
        Ok(alive)
    }

    /// Everything of the job on the host, the record and the slot claim last:
    /// until then a crash leaves enough for recovery. `held` are the job's
    /// namespaces the agent kept, released on the way.
    async fn remove_traces(
        &self,
        rec: &JobRecord,
        held: Option<super::JobMounts>,
    ) -> Result<(), SandboxError> {
        let cfg = self.cfg.clone();
        let rec = rec.clone();
        let id = rec.id.clone();
        let pool = self.host.project_caches.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
            if let Some(cg) = &rec.cgroup {
                cg.remove()?;
            }
            let dir = record::job_dir(&cfg.state_dir, &rec.id);
            // Independent, and each mostly waiting: on iptables' processes,
            // on the kernel's RCU grace periods as the link and the held
            // namespaces go, on the filesystem as the job's files go.
            let (rules, link, files) = std::thread::scope(|s| {
                let link = s.spawn(|| net::delete_link(&rec.id));
                let rules = s.spawn(|| net::delete_rules(&rec.id));
                s.spawn(move || drop(held));
                let files = remove_files(&dir, &rec, pool.as_deref());
                let join = |r: std::thread::Result<Result<(), net::NetError>>| {
                    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
                };
                (join(rules.join()), join(link.join()), files)
            });
            rules?;
            link?;
            files?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
            }
            slots::release(&cfg.state_dir, rec.slot, &rec.id).map_err(io(
                "cannot release slot in",
                &slots::slots_dir(&cfg.state_dir),
            ))?;
            Ok(())
        })
        .await
        .map_err(|e| start_err(&id, e))?
    }

    /// Tears down every job an earlier agent left in the state dir (one
    /// that crashed or was killed), as found when this engine was made, and
    /// releases slot claims that had no job. Safe beside new starts: it never
    /// looks at what this engine made. Returns the ids torn down; those that
    /// fail stay in [`Engine::stuck`] for a retry.
    pub async fn recover(&self) -> Vec<Result<String, SandboxError>> {
        let left = std::mem::take(&mut *self.left.locked());
        let mut out = Vec::new();
        for id in left.jobs {
            tracing::warn!(job = %id, "recovering job left by a previous run");
            out.push(self.teardown(&id).await.map(|t| t.id).or_else(|e| match e {
                // A directory without a record: created and crashed before the
                // record was written. Nothing else of it exists.
                SandboxError::NoSuchJob(_) => {
                    let dir = record::job_dir(&self.cfg.state_dir, &id);
                    match std::fs::remove_dir_all(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(io("cannot remove", &dir)(e))
                        }
                        _ => Ok(id.clone()),
                    }
                }
                e => Err(e),
            }));
        }
        for (n, owner) in left.claims {
            // Released only while still claimed by that owner.
            let _ = slots::release(&self.cfg.state_dir, n, &owner);
        }
        out
    }

    /// Tears down every job of this process (agent shutdown).
    pub async fn shutdown(&self) -> Vec<Result<Teardown, SandboxError>> {
        let ids: Vec<String> = self.jobs.locked().keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.push(self.teardown(&id).await);
        }
        out
    }
}

/// The job's files in its directory (its disk, dockerd's tree, the API
/// socket's directory) and its project cache image: all but the record.
fn remove_files(
    dir: &std::path::Path,
    rec: &JobRecord,
    pool: Option<&super::fs::caches::Pool>,
) -> Result<(), SandboxError> {
    disk::remove(dir, &dir.join("root"))?;
    if let Some(image) = &rec.disk_image {
        match std::fs::remove_file(image) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", image)(e)),
        }
        if let Some(pool) = pool {
            pool.release(&rec.id);
        }
    }
    for entry in ["root", "api"] {
        let p = dir.join(entry);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(io("cannot remove", &p))?;
        }
    }
    Ok(())
}

/// True when `pid` is still this job's stage-1/init process (not a reused pid).
fn is_job_process(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let s = String::from_utf8_lossy(&c);
            s.contains(HIDDEN_SUBCOMMAND) && s.contains(id)
        })
        .unwrap_or(false)
}

/// Waits until no loop device is backed by `image` any more: the last
/// mount of the filesystem in it is gone and it was written out.
async fn released(image: &std::path::Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if !loop_backed(image) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} is still in use by a loop device after 10 s",
                image.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a loop device is backed by `image` (its backing file, as
/// `/sys/block/loop*/loop/backing_file` names it, is `image`).
fn loop_backed(image: &std::path::Path) -> bool {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .any(|b| std::path::Path::new(b.trim_end()) == image)
}
