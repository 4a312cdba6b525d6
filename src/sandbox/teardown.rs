//! Ending jobs: a job's processes killed, then every trace of it removed
//! from the host (cgroups, rules, link, directories, last the record and the
//! slot claim); recovery of what an earlier agent left; shutdown.

use std::time::{Duration, Instant};

use super::child::HIDDEN_SUBCOMMAND;
use super::{
    Engine, JobRecord, SandboxError, Status, Teardown, io, net, ping, record, slots, start_err, sys,
};

impl Engine {
    /// Stops a job: SIGTERM to its init (forwarded to dockerd), a bounded
    /// grace, SIGKILL of everything left, then removal of every trace on the
    /// host. Idempotent; works for jobs of this process and for records left
    /// by an earlier one.
    pub async fn teardown(&self, id: &str) -> Result<Teardown, SandboxError> {
        let t0 = Instant::now();
        let live = self.get(id);
        let rec = match &live {
            Some(sb) => JobRecord::load(&self.cfg.state_dir, id).unwrap_or_else(|_| sb.record()),
            None => JobRecord::load(&self.cfg.state_dir, id)
                .map_err(|_| SandboxError::NoSuchJob(id.into()))?,
        };
        let mut killed = false;
        if let Some(sb) = &live {
            sb.inner.status.send_modify(|s| {
                if !matches!(s, Status::Stopped) {
                    *s = Status::Stopping
                }
            });
            let mut exited = sb.inner.exited.clone();
            if exited.borrow().is_none() {
                // With no container running, a graceful stop protects nothing
                // (the job's state is discarded) and dockerd 20.10 spends a
                // fixed second waiting for its containerd: go straight to the kill.
                let idle = ping::running_containers(&sb.socket()).await == Some(0);
                if let (Some(init), false) = (rec.init_pid, idle) {
                    sys::kill(init as i32, nix::sys::signal::Signal::SIGTERM).ok();
                }
                let grace = if idle {
                    Duration::ZERO
                } else {
                    self.cfg.stop_grace
                };
                if grace.is_zero()
                    || tokio::time::timeout(grace, exited.wait_for(|e| e.is_some()))
                        .await
                        .is_err()
                {
                    killed = true;
                    if let Some(init) = rec.init_pid {
                        // Killing a pid namespace's init kills every process in it.
                        sys::kill(init as i32, nix::sys::signal::Signal::SIGKILL).ok();
                    }
                }
            }
        } else if let Some(init) = rec.init_pid.filter(|p| is_job_process(*p, id)) {
            killed = true;
            sys::kill(init as i32, nix::sys::signal::Signal::SIGKILL).ok();
        }
        let cfg = self.cfg.clone();
        let rec2 = rec.clone();
        let id2 = id.to_string();
        let cg = rec.cgroup.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
            if let Some(cg) = &cg {
                cg.kill_all(Duration::from_secs(10))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| start_err(id, e))??;
        if let Some(sb) = &live {
            let mut exited = sb.inner.exited.clone();
            let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| e.is_some()))
                .await;
            sb.inner.relay.lock().unwrap().take();
        }
        tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
            if let Some(cg) = &rec2.cgroup {
                cg.remove()?;
            }
            net::delete_rules(&id2)?;
            net::delete_link(&id2)?;
            let dir = record::job_dir(&cfg.state_dir, &id2);
            // The record goes last: until here a crash leaves it for recovery.
            for entry in ["root", "api"] {
                let p = dir.join(entry);
                if p.exists() {
                    std::fs::remove_dir_all(&p).map_err(io("cannot remove", &p))?;
                }
            }
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
            }
            slots::release(&cfg.state_dir, rec2.slot, &id2).map_err(io(
                "cannot release slot in",
                &slots::slots_dir(&cfg.state_dir),
            ))?;
            Ok(())
        })
        .await
        .map_err(|e| start_err(id, e))??;
        if let Some(sb) = self.jobs.lock().unwrap().remove(id) {
            sb.inner.status.send_replace(Status::Stopped);
        }
        let took = t0.elapsed();
        tracing::info!(job = %id, took_ms = took.as_millis() as u64, killed, "job torn down");
        Ok(Teardown {
            id: id.into(),
            took,
            killed,
        })
    }

    /// Tears down every job recorded in the state dir that this process does
    /// not run (left by an agent that crashed or was killed), and releases
    /// slot claims that have no job. Returns the ids torn down.
    pub async fn recover(&self) -> Vec<Result<String, SandboxError>> {
        let mut out = Vec::new();
        for id in JobRecord::list_ids(&self.cfg.state_dir) {
            if self.get(&id).is_some() {
                continue;
            }
            tracing::warn!(job = %id, "recovering job left by a previous run");
            out.push(self.teardown(&id).await.map(|t| t.id).or_else(|e| match e {
                // A directory without a record: created and crashed before the
                // record was written. Nothing else of it exists.
                SandboxError::NoSuchJob(_) => {
                    let dir = record::job_dir(&self.cfg.state_dir, &id);
                    std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
                    Ok(id.clone())
                }
                e => Err(e),
            }));
        }
        let state = self.cfg.state_dir.clone();
        let orphans =
            slots::orphan_claims(&state, &|owner| record::job_dir(&state, owner).exists());
        for (n, owner) in orphans {
            let _ = slots::release(&state, n, &owner);
        }
        out
    }

    /// Tears down every job of this process (agent shutdown).
    pub async fn shutdown(&self) -> Vec<Result<Teardown, SandboxError>> {
        let ids: Vec<String> = self.jobs.lock().unwrap().keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.push(self.teardown(&id).await);
        }
        out
    }
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
