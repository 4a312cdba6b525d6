//! Starting a job, as named steps: claim a slot and write the record, make
//! the job's directories and files, its cgroups, its rules; spawn the
//! stage-1 helper and walk it through the handshake (cgroup placement, uid
//! maps, the link made with its job's end in the job's namespace); start
//! its DNS relay; wait for dockerd to answer; load preloaded images. Any
//! failure tears down what was made.

use crate::locks::Lock;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::binfmt;
use super::child::{ChildSpec, HIDDEN_SUBCOMMAND};
use super::fs::caches::Key;
use super::fs::disk;
use super::fs::idmap::IdmapNs;
use super::fs::root;
use super::fs::workspaces::{self, Workspace, WorkspaceRequest};
use super::health;
use super::host::{chown, mkdir_mode};
use super::net::dns;
use super::{
    Engine, ImageStore, Inner, JobCgroup, JobRecord, Limits, Sandbox, SandboxError, SeedState,
    Status, code_of, config, describe_exit, evidence, io, net, ping, protocol, record, seed, slots,
    start_err, sys,
};

/// What a job asks of its sandbox beyond the agent's defaults.
#[derive(Debug, Clone, Default)]
pub struct StartRequest<'a> {
    /// Its limits; what it leaves out comes from the defaults.
    pub limits: Option<Limits>,
    /// Host directories bound in (see `fs::workspaces`).
    pub workspaces: &'a [WorkspaceRequest],
    /// The project cache it starts from.
    pub key: Option<&'a Key>,
    /// Whether it runs foreign binaries through the host's emulators; the
    /// agent's `host_emulation` when None.
    pub emulation: Option<bool>,
}

impl Engine {
    /// Starts a job and returns once its dockerd answers `/_ping`.
    pub async fn start(&self, limits: Option<Limits>) -> Result<Sandbox, SandboxError> {
        self.start_job(limits, &[]).await
    }

    /// Starts a job with host directories bound in (see `fs::workspaces`).
    pub async fn start_job(
        &self,
        limits: Option<Limits>,
        workspaces: &[WorkspaceRequest],
    ) -> Result<Sandbox, SandboxError> {
        self.start_keyed(limits, workspaces, None).await
    }

    /// Starts a job whose disk is a copy of `key`'s project cache (empty
    /// the first time), which it may later commit
    /// ([`Engine::teardown_committing`]).
    pub async fn start_keyed(
        &self,
        limits: Option<Limits>,
        workspaces: &[WorkspaceRequest],
        key: Option<&Key>,
    ) -> Result<Sandbox, SandboxError> {
        self.start_for(StartRequest {
            limits,
            workspaces,
            key,
            emulation: None,
        })
        .await
    }

    /// Starts a job as `req` asks.
    pub async fn start_for(&self, req: StartRequest<'_>) -> Result<Sandbox, SandboxError> {
        let StartRequest {
            limits,
            workspaces,
            key,
            emulation,
        } = req;
        let emulation = self.emulation(emulation)?;
        if key.is_some() && self.host.project_caches.is_none() {
            return Err(SandboxError::Config(config::ConfigError::Invalid {
                key: "cache_key",
                why: "this agent keeps no project caches ([project_caches] enabled = true turns them on)"
                    .into(),
            }));
        }
        // The shared store is the classic one's layout; a containerd store
        // loads the preloads into each job. A keyed job's images come from
        // its key.
        let seed = if key.is_some()
            || self.host.preloads.is_empty()
            || !self.cfg.share_preloads
            || self.cfg.image_store == ImageStore::Containerd
        {
            None
        } else {
            self.ensure_seed().await
        };
        self.start_with(limits, seed, workspaces, key, emulation)
            .await
    }

    /// Whether a job that asks `asked` gets the host's emulators. A job may
    /// go without them where the kernel gives it a binfmt_misc instance of
    /// its own; it never gets them where the agent's configuration is
    /// without.
    pub fn emulation(&self, asked: Option<bool>) -> Result<bool, SandboxError> {
        let refuse = |why: String| {
            Err(SandboxError::Config(config::ConfigError::Invalid {
                key: "emulation",
                why,
            }))
        };
        match asked {
            None => Ok(self.cfg.host_emulation),
            Some(true) if !self.cfg.host_emulation => refuse(
                "this agent runs jobs without the host's emulators ([sandbox] host_emulation = false)"
                    .into(),
            ),
            Some(false) if !self.host.own_binfmt => {
                refuse(format!("emulation = false {}", binfmt::needs_own_instances()))
            }
            Some(on) => Ok(on),
        }
    }

    /// The shared image store, built on first use from a sandbox that loads
    /// the preloads. None (and every job loads the archives itself) where
    /// idmapped mounts are not available.
    async fn ensure_seed(&self) -> Option<Arc<seed::Seed>> {
        let mut state = self.seed.lock().await;
        match &*state {
            SeedState::Ready(s) => return Some(s.clone()),
            SeedState::Off => return None,
            SeedState::Unbuilt => {}
        }
        let t0 = Instant::now();
        match self.build_seed().await {
            Ok(s) => {
                tracing::info!(
                    layers = s.layers.len(),
                    took_ms = t0.elapsed().as_millis() as u64,
                    "shared image store ready: preloaded images are mounted into jobs, not copied"
                );
                let s = Arc::new(s);
                *state = SeedState::Ready(s.clone());
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared images unavailable: every job loads the preloaded archives itself");
                let _ = seed::remove(&self.cfg.state_dir.join("seed"));
                *state = SeedState::Off;
                None
            }
        }
    }

    async fn build_seed(&self) -> Result<seed::Seed, SandboxError> {
        // Its data-root is renamed into the seed: on the state dir's
        // filesystem, not on a disk of its own.
        let limits = Limits {
            disk_bytes: Some(0),
            ..self.cfg.default_limits.clone()
        };
        let sb = Box::pin(self.start_with(Some(limits), None, &[], None, self.cfg.host_emulation))
            .await?;
        let rec = sb.record();
        // Stop dockerd gracefully so that its image store is complete on disk.
        sb.inner.status.send_replace(Status::Stopping);
        if let Some(init) = rec.init_pid {
            sys::kill(init as i32, nix::sys::signal::Signal::SIGTERM).ok();
        }
        let mut exited = sb.inner.exited.clone();
        if tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| e.is_some()))
            .await
            .is_err()
        {
            if let Some(init) = rec.init_pid {
                sys::kill(init as i32, nix::sys::signal::Signal::SIGKILL).ok();
            }
            let _ = exited.wait_for(|e| e.is_some()).await;
        }
        let data = sb.inner.dir.join("root").join("data");
        let dest = self.cfg.state_dir.join("seed").join("data");
        let host_id = rec.host_id;
        let adopted = tokio::task::spawn_blocking(move || seed::adopt(&data, &dest, host_id))
            .await
            .map_err(|e| start_err(sb.id(), e))?;
        self.teardown(sb.id()).await?;
        let s = adopted?;
        // Idmapped mounts of this filesystem must work here, or jobs load.
        probe_idmap(&s.data)?;
        Ok(s)
    }

    async fn start_with(
        &self,
        limits: Option<Limits>,
        seed: Option<Arc<seed::Seed>>,
        workspaces: &[WorkspaceRequest],
        key: Option<&Key>,
        emulation: bool,
    ) -> Result<Sandbox, SandboxError> {
        // What a job leaves out of its limits, it gets from the defaults.
        let limits = limits.map_or_else(
            || self.cfg.default_limits.clone(),
            |l| l.or(&self.cfg.default_limits),
        );
        limits.validate()?;
        if key.is_some() && limits.disk().is_none() {
            return Err(SandboxError::Config(config::ConfigError::Invalid {
                key: "limits.disk_bytes",
                why: "a job with a cache key needs a disk of its own (disk_bytes above 0)".into(),
            }));
        }
        let id = new_id();
        let cfg = self.cfg.clone();
        let workspaces = self.claim_workspaces(&id, workspaces).await?;
        let slot = {
            let (cfg, jid) = (cfg.clone(), id.clone());
            tokio::task::spawn_blocking(move || slots::claim(&cfg, &jid))
                .await
                .map_err(|e| start_err(&id, e))?
        };
        let slot = match slot {
            Ok(s) => s,
            Err(e) => {
                self.release_workspaces(&id);
                return Err(e.into());
            }
        };
        let (host_ip, job_ip) = cfg.link_addrs(slot);
        let host_id = slots::range_of(&cfg, slot).start as u32;
        let dir = record::job_dir(&cfg.state_dir, &id);
        let mut rec = JobRecord {
            id: id.clone(),
            slot,
            host_id,
            host_ip,
            job_ip,
            ports: cfg.port_block(slot),
            cgroup: self
                .host
                .layout
                .clone()
                .map(|l| JobCgroup::new(l, &cfg.cgroup_parent, &id)),
            monitor_pid: None,
            init_pid: None,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            cache_key: key.cloned(),
            disk_image: key
                .and(self.host.project_caches.as_ref())
                .map(|p| p.job_image(&id)),
            emulation,
        };
        if let Err(e) = mkdir_mode(&dir, 0o711).and_then(|()| {
            rec.save(&cfg.state_dir)
                .map_err(io("cannot write record in", &dir))
        }) {
            let _ = slots::release(&cfg.state_dir, slot, &id);
            self.release_workspaces(&id);
            return Err(e);
        }
        let (status, _) = watch::channel(Status::Starting);
        let (exited_tx, exited) = watch::channel(None);
        let sb = Sandbox {
            inner: Arc::new(Inner {
                id: id.clone(),
                record: Mutex::new(rec.clone()),
                dir: dir.clone(),
                status,
                exited,
                relay: Mutex::new(None),
                mounts: Mutex::new(None),
                started: Instant::now(),
                cache_hit: std::sync::OnceLock::new(),
            }),
        };
        self.jobs.locked().insert(id.clone(), sb.clone());
        match self
            .launch(&sb, &mut rec, &limits, exited_tx, seed, &workspaces)
            .await
        {
            Ok(()) => {
                sb.inner.status.send_if_modified(|s| {
                    if *s == Status::Starting {
                        *s = Status::Running;
                        true
                    } else {
                        false
                    }
                });
                tracing::info!(job = %id, slot, took_ms = sb.age().as_millis() as u64, "job ready");
                health::watch(sb.clone(), cfg.health_interval);
                Ok(sb)
            }
            Err(e) => {
                // The log goes with the job's directory: keep it first.
                let kept = evidence::keep(&cfg.state_dir, &id, &sb.dockerd_log());
                tracing::warn!(job = %id, error = %e, log = ?kept.as_ref().map(|k| &k.path),
                    "job failed to start; tearing it down");
                if let Err(te) = self.teardown(&id).await {
                    tracing::error!(job = %id, error = %te, "teardown after failed start");
                }
                Err(SandboxError::StartFailed {
                    id,
                    source: Box::new(e),
                    kept,
                })
            }
        }
    }

    /// The steps of a start, in order. The record is on disk before the
    /// first: whatever a step made, a failure (or a crash) is torn down.
    async fn launch(
        &self,
        sb: &Sandbox,
        rec: &mut JobRecord,
        limits: &Limits,
        exited_tx: watch::Sender<Option<i32>>,
        seed: Option<Arc<seed::Seed>>,
        workspaces: &[Workspace],
    ) -> Result<(), SandboxError> {
        // Independent, and each mostly waiting on the kernel or a tool. All
        // three finish before a failure counts: each runs as a blocking task
        // that goes on when its future is dropped (as try_join! drops the
        // others at the first error), and would make its disk, rules or
        // cgroups after the teardown that follows the failure.
        let (disk, cgroups, rules) = tokio::join!(
            self.make_disk(sb, rec, limits),
            self.make_cgroups(rec, limits),
            self.make_rules(rec),
        );
        disk.and(cgroups).and(rules)?;
        let files = self
            .make_files(sb, rec, seed.as_deref(), workspaces.len())
            .await?;
        let spec = self.child_spec(rec, &files, seed.as_deref(), workspaces);
        let (pid, chan) = self.spawn_helper(sb, rec, &spec, &files, exited_tx)?;
        let ns = self
            .handshake(sb, rec, pid, chan, seed.as_deref(), workspaces)
            .await?;
        *sb.inner.mounts.locked() = Some(super::JobMounts {
            job: ns.mnt,
            outer: ns.outer_mnt,
            attached: 0,
        });
        // The link's host end exists from the handshake on; nothing in the
        // job asks for a name before its dockerd answers.
        self.start_dns(sb, rec).await?;
        self.wait_ready(sb).await?;
        self.widen_ephemeral_ports(rec, ns.net).await?;
        self.preload(sb, seed.is_some()).await
    }

    /// Checks the workspaces a job asks for and claims them for it, at once
    /// (no other start can claim one between the check and the claim).
    async fn claim_workspaces(
        &self,
        id: &str,
        reqs: &[WorkspaceRequest],
    ) -> Result<Vec<Workspace>, SandboxError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.checked_workspaces(reqs, Some(id)).await
    }

    /// The workspaces `reqs` ask for, checked against the rules and the
    /// live claims, whose lock the check holds throughout. With `claim`,
    /// they are claimed for that job and each `DIR@tmp` is made.
    async fn checked_workspaces(
        &self,
        reqs: &[WorkspaceRequest],
        claim: Option<&str>,
    ) -> Result<Vec<Workspace>, SandboxError> {
        let reqs = reqs.to_vec();
        let (rules, job) = (self.host.workspace_rules.clone(), claim.map(str::to_string));
        let claims = self.workspaces.clone();
        tokio::task::spawn_blocking(move || {
            let mut live = claims.locked();
            let ws = workspaces::check(&reqs, &rules, &live, job.is_some())?;
            if let Some(job) = job {
                live.extend(ws.iter().map(|w| (w.dir.clone(), job.clone())));
            }
            Ok(ws)
        })
        .await
        .map_err(|e| start_err(claim.unwrap_or("workspaces"), e))?
    }

    /// Brings workspaces into a running job that has never been handed out
    /// (a warm one): each is checked and claimed for it, its idmapped mount
    /// made as for a start, attached below the job's drop point in the
    /// helper's namespace (propagation carries it into the job's, its flags
    /// locked there) and bound at its own path in the job's root.
    pub async fn attach_workspaces(
        &self,
        sb: &Sandbox,
        reqs: &[WorkspaceRequest],
    ) -> Result<(), SandboxError> {
        let id = sb.id().to_string();
        let ws = self.claim_workspaces(&id, reqs).await?;
        let (sb2, host_id) = (sb.clone(), sb.record().host_id);
        let r = tokio::task::spawn_blocking(move || attach(&sb2, host_id, &ws))
            .await
            .map_err(|e| start_err(&id, e))
            .and_then(|r| r);
        if r.is_err() {
            self.release_workspaces(&id);
        }
        r
    }

    /// Gives up the workspaces claimed for job `id`.
    pub(super) fn release_workspaces(&self, id: &str) {
        self.workspaces.locked().retain(|(_, job)| job != id);
    }

    /// Checks workspaces as a start or an attach would, without claiming or
    /// making anything.
    pub async fn check_workspaces(&self, reqs: &[WorkspaceRequest]) -> Result<(), SandboxError> {
        self.checked_workspaces(reqs, None).await.map(drop)
    }

    /// dockerd takes the ports it publishes from the job's
    /// `ip_local_port_range`, which the job's init narrowed to the job's
    /// block; dockerd has read it once it answers. The job's own outgoing
    /// connections get the host's whole range back: a block of 64 ports
    /// would run out within a minute of pushing layers (each closed
    /// connection holds its port for TIME_WAIT).
    async fn widen_ephemeral_ports(
        &self,
        rec: &JobRecord,
        netns: OwnedFd,
    ) -> Result<(), SandboxError> {
        if rec.ports.is_none() {
            return Ok(());
        }
        let (id, range) = (rec.id.clone(), self.host.ephemeral_ports.clone());
        tokio::task::spawn_blocking(move || {
            let file = Path::new(super::host::EPHEMERAL_PORTS);
            sys::in_netns(netns.as_fd(), || std::fs::write(file, range))
                .map_err(|e| start_err(&id, e))?
                .map_err(io("cannot write the job's", file))
        })
        .await
        .map_err(|e| start_err(&rec.id, e))?
    }

    /// The job's `root` (everything its dockerd writes), on a filesystem of
    /// its own when the job has a disk bound.
    async fn make_disk(
        &self,
        sb: &Sandbox,
        rec: &JobRecord,
        limits: &Limits,
    ) -> Result<(), SandboxError> {
        let root = sb.inner.dir.join("root");
        mkdir_mode(&root, 0o700)?;
        match limits.disk() {
            Some(bytes) if let Some(image) = rec.disk_image.clone() => {
                let dir = sb.inner.dir.clone();
                let copy = rec.cache_key.clone().zip(self.host.project_caches.clone());
                // The copy waits on the key's lock while a commit holds it:
                // off the runtime's threads, with the disk's making.
                let id = rec.id.clone();
                let hit = tokio::task::spawn_blocking(move || {
                    let hit = match copy {
                        Some((key, pool)) => {
                            pool.reserve(&id, bytes).map_err(|e| start_err(&id, e))?;
                            let t0 = std::time::Instant::now();
                            let hit = pool
                                .store
                                .copy_current(&key, &image)
                                .map_err(|e| start_err(&id, e))?;
                            let took = t0.elapsed();
                            // This job's own bound holds on top of the copy.
                            if hit {
                                disk::fit(&image, bytes).map_err(|e| match e {
                                    disk::DiskError::TooSmall { .. } => {
                                        SandboxError::Config(config::ConfigError::Invalid {
                                            key: "limits.disk_bytes",
                                            why: format!("project cache {key}: {e}"),
                                        })
                                    }
                                    e => start_err(&id, format!("project cache {key}: {e}")),
                                })?;
                            }
                            Some((hit, took))
                        }
                        None => None,
                    };
                    disk::create_staged(&dir, &image, bytes)?;
                    Ok::<_, SandboxError>(hit)
                })
                .await
                .map_err(|e| start_err(&rec.id, e))??;
                if let (Some((hit, took)), Some(key)) = (hit, &rec.cache_key) {
                    tracing::info!(job = %rec.id, key = %key, hit, copy_ms = took.as_millis() as u64, "project cache");
                    let _ = sb.inner.cache_hit.set((hit, took));
                }
            }
            Some(bytes) => {
                let (dir, uid) = (sb.inner.dir.clone(), rec.host_id);
                tokio::task::spawn_blocking(move || disk::create(&dir, &root, bytes, uid))
                    .await
                    .map_err(|e| start_err(&rec.id, e))??;
            }
            None => chown(&root, rec.host_id)?,
        }
        Ok(())
    }

    /// The job's directories (private to its root: other jobs map other
    /// ids), the shared images' metadata and daemon.json.
    async fn make_files(
        &self,
        sb: &Sandbox,
        rec: &JobRecord,
        seed: Option<&seed::Seed>,
        workspaces: usize,
    ) -> Result<JobFiles, SandboxError> {
        let dir = sb.inner.dir.clone();
        let api = dir.join("api");
        mkdir_mode(&api, 0o700)?;
        chown(&api, rec.host_id)?;
        // An idmapped disk is laid out as it is on disk (ids of the job's
        // namespace), before the job's view of it is attached.
        let staged = dir.join(disk::STAGING);
        let keyed = staged.is_dir();
        let (root, owner) = if keyed {
            (staged, 0)
        } else {
            (dir.join("root"), rec.host_id)
        };
        if keyed {
            forget_the_last_run(&root)?;
        }
        for sub in ["data", "exec", "home", "xdg", "tmp", "etc-docker"] {
            let p = root.join(sub);
            mkdir_mode(&p, 0o700)?;
            chown(&p, owner)?;
        }
        if let Some(sd) = seed {
            let (sd, jd, data, uid) = (sd.clone(), dir.clone(), root.join("data"), owner);
            tokio::task::spawn_blocking(move || seed::materialize(&sd, &jd, &data, uid))
                .await
                .map_err(|e| start_err(&rec.id, e))??;
        }
        let daemon_json = root.join("daemon.json");
        std::fs::write(
            &daemon_json,
            daemon_json_text(
                self.host.mtu,
                self.host.engine.has_default_network_opts(),
                self.cfg.image_store,
                &self.host.registries,
            ),
        )
        .map_err(io("cannot write", &daemon_json))?;
        chown(&daemon_json, owner)?;
        if self.containerd_first() {
            let config = root.join("containerd.toml");
            std::fs::write(&config, containerd_toml()).map_err(io("cannot write", &config))?;
            chown(&config, owner)?;
        }
        // Private CAs where dockerd looks for them: /etc/docker/certs.d.
        let certs_d = root.join("etc-docker").join("certs.d");
        if !self.host.registries.cas.is_empty() {
            mkdir_mode(&certs_d, 0o755)?;
            chown(&certs_d, owner)?;
        }
        for (registry, pem) in &self.host.registries.cas {
            let d = certs_d.join(registry);
            mkdir_mode(&d, 0o755)?;
            chown(&d, owner)?;
            let f = d.join("ca.crt");
            std::fs::write(&f, pem).map_err(io("cannot write", &f))?;
            chown(&f, owner)?;
        }
        if root != dir.join("root") {
            let (jd, uid) = (dir.clone(), rec.host_id);
            tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
                let ns = layers_idmap(uid)?;
                disk::attach_idmapped(&jd, &jd.join("root"), ns.fd())?;
                Ok(())
            })
            .await
            .map_err(|e| start_err(&rec.id, e))??;
        }
        // The job's init mounts its private root here, and the helper the
        // job's drop point, each in a mount namespace of the job's own: on
        // the host they stay empty directories.
        mkdir_mode(&dir.join("rootfs"), 0o755)?;
        mkdir_mode(&dir.join("drop"), 0o755)?;
        // Where the stage-1 helper attaches the workspaces' idmapped mounts,
        // for the job's init to bind at their own paths: directories of
        // the agent's, which no workspace owner can swap for a link.
        if workspaces > 0 {
            mkdir_mode(&dir.join("workspaces"), 0o711)?;
            for i in 0..workspaces {
                mkdir_mode(&workspace_mount_point(&dir, i), 0o700)?;
            }
        }
        Ok(JobFiles {
            log: dir.join("dockerd.log"),
            dir,
        })
    }

    /// The job's limit cgroup and its delegated child (none in the rootless
    /// fallback).
    async fn make_cgroups(&self, rec: &JobRecord, limits: &Limits) -> Result<(), SandboxError> {
        let Some(cg) = rec.cgroup.clone() else {
            return Ok(());
        };
        let (l, uid) = (limits.clone(), rec.host_id);
        tokio::task::spawn_blocking(move || cg.create(&l, uid, uid))
            .await
            .map_err(|e| start_err(&rec.id, e))??;
        Ok(())
    }

    /// The job's rules. They name its link, which the handshake makes once
    /// the job's network namespace exists.
    async fn make_rules(&self, rec: &JobRecord) -> Result<(), SandboxError> {
        let id = rec.id.clone();
        let addrs = net::JobAddrs {
            host_ip: rec.host_ip,
            job_ip: rec.job_ip,
            ports: rec.ports,
            cache: self.host.cache.as_ref().map(|c| c.addr()),
        };
        tokio::task::spawn_blocking(move || net::add_rules(&id, &addrs))
            .await
            .map_err(|e| start_err(&rec.id, e))??;
        Ok(())
    }

    /// The job's DNS relay on the host end of its link.
    async fn start_dns(&self, sb: &Sandbox, rec: &JobRecord) -> Result<(), SandboxError> {
        let relay = dns::Relay::start(
            SocketAddr::new(rec.host_ip.into(), 53),
            self.host.upstreams.clone(),
        )
        .await?;
        *sb.inner.relay.locked() = Some(relay);
        Ok(())
    }

    /// Everything the job's side needs to know.
    fn child_spec(
        &self,
        rec: &JobRecord,
        files: &JobFiles,
        seed: Option<&seed::Seed>,
        workspaces: &[Workspace],
    ) -> ChildSpec {
        let (cfg, id) = (&self.cfg, &rec.id);
        let hostname = format!("berth-{id}");
        let mounted: Vec<(PathBuf, PathBuf)> = workspaces
            .iter()
            .enumerate()
            .map(|(i, w)| (workspace_mount_point(&files.dir, i), w.at.clone()))
            .collect();
        ChildSpec {
            job_id: id.clone(),
            dockerd: cfg.dockerd.clone(),
            path: self.host.engine.path.clone(),
            new_root: files.dir.join("rootfs"),
            root: root::plan(
                &self.host.root,
                &root::JobRoot {
                    dir: &files.dir,
                    hostname: &hostname,
                    job_ip: rec.job_ip,
                    host_ip: rec.host_ip,
                    layers: seed.is_some(),
                    host_cgroups: self.host.layout.is_none()
                        && Path::new("/sys/fs/cgroup").is_dir(),
                    workspaces: &mounted,
                },
            ),
            hostname: hostname.clone(),
            cgroup: self.host.layout.clone(),
            cgroupns: self.host.layout.is_some() && cfg.proc_root.join("self/ns/cgroup").exists(),
            peer_ifname: net::peer_ifname(id),
            job_ip: rec.job_ip,
            host_ip: rec.host_ip,
            ports: rec.ports,
            mtu: self.host.mtu,
            // dockerd stops its containers within the grace, leaving it a
            // margin to exit before the SIGKILL.
            shutdown_timeout: (cfg.stop_grace.as_secs() * 3 / 5).max(1),
            extra_args: cfg
                .extra_dockerd_args
                .iter()
                .chain(&cfg.unchecked_dockerd_args)
                .cloned()
                .collect(),
            shared_layers: seed
                .map(|sd| {
                    (0..sd.layers.len())
                        .map(|i| seed::layer_mount_point(&files.dir, i))
                        .collect()
                })
                .unwrap_or_default(),
            workspaces: mounted.into_iter().map(|(from, _)| from).collect(),
            drop: files.dir.join("drop"),
            binfmt: self
                .host
                .own_binfmt
                .then(|| self.binfmt_handlers(rec.emulation)),
            owner: rec.host_id,
            containerd_config: self
                .containerd_first()
                .then(|| root::inside::CONTAINERD_CONFIG.into()),
        }
    }

    /// Whether the job's init starts containerd itself and hands it to
    /// dockerd (`--containerd`) rather than letting dockerd start its own:
    /// every ordinary dockerd; a rootless one keeps its own.
    /// - dockerd 26.1 dials the containerd it has just started before that
    ///   containerd listens, and its gRPC client then waits a second before
    ///   dialling again: a second of every cold start.
    /// - The configuration is berth's ([`containerd_toml`]), which spares
    ///   an idle job's containerd most of its wakeups.
    fn containerd_first(&self) -> bool {
        self.host.layout.is_some()
    }

    /// The host's enabled binfmt_misc handlers as they are now (a package
    /// installed since the agent started counts), or none for a job without
    /// emulation.
    fn binfmt_handlers(&self, emulation: bool) -> Vec<binfmt::Handler> {
        if !emulation {
            return Vec::new();
        }
        match binfmt::handlers(Path::new(binfmt::MOUNT)) {
            Ok(hs) => hs.into_iter().filter(|h| h.enabled).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the host's binfmt_misc handlers: the job gets none");
                Vec::new()
            }
        }
    }

    /// Starts the stage-1 helper with only its end of the channel (fd 3),
    /// an empty environment and the job's log as stdout and stderr, and
    /// watches it from then on: its exit is the job's end.
    fn spawn_helper(
        &self,
        sb: &Sandbox,
        rec: &mut JobRecord,
        spec: &ChildSpec,
        files: &JobFiles,
        exited_tx: watch::Sender<Option<i32>>,
    ) -> Result<(u32, protocol::AgentEnd), SandboxError> {
        let id = rec.id.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&files.log)
            .map_err(io("cannot open", &files.log))?;
        let (chan, theirs) = protocol::pair().map_err(|e| start_err(&id, e))?;
        let mut cmd = tokio::process::Command::new(&self.host.helper);
        cmd.arg(HIDDEN_SUBCOMMAND)
            .arg(serde_json::to_string(spec).map_err(|e| start_err(&id, e))?)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io("cannot dup", &files.log))?)
            .stderr(log);
        sys::place_on_fd3(&mut cmd, theirs.as_raw_fd());
        let mut child = cmd
            .spawn()
            .map_err(io("cannot start helper", &self.host.helper))?;
        drop(theirs);
        let pid = child
            .id()
            .ok_or_else(|| start_err(&id, "helper exited at once"))?;
        rec.monitor_pid = Some(pid);
        self.save_record(sb, rec)?;

        let status = sb.inner.status.clone();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(s) => std::os::unix::process::ExitStatusExt::into_raw(s),
                Err(_) => -1,
            };
            let code = code_of(code);
            let _ = exited_tx.send(Some(code));
            status.send_modify(|s| {
                *s = match s {
                    Status::Stopping | Status::Stopped => Status::Stopped,
                    _ => {
                        let why = describe_exit(code);
                        tracing::warn!(job = %id, %why, "job's dockerd ended unexpectedly");
                        Status::Failed(why)
                    }
                }
            });
        });
        Ok((pid, chan))
    }

    /// Walks the helper through the protocol, off the runtime: cgroup
    /// placement, the shared layers, uid maps, the link, its init.
    async fn handshake(
        &self,
        sb: &Sandbox,
        rec: &mut JobRecord,
        pid: u32,
        chan: protocol::AgentEnd,
        seed: Option<&seed::Seed>,
        workspaces: &[Workspace],
    ) -> Result<protocol::Namespaces, SandboxError> {
        // The shared layers, seen through the job's id map, go to the helper
        // by fd; it attaches them before it creates the job's namespaces.
        let mut trees = Vec::new();
        if let Some(sd) = seed {
            let ns = layers_idmap(rec.host_id)?;
            for l in &sd.layers {
                trees.push(
                    sys::idmapped_readonly_clone(&sd.data.join(l), ns.fd())
                        .map_err(|e| start_err(&rec.id, e))?,
                );
            }
        }
        // Then the workspaces, each seen through a map of one id.
        trees.extend(workspaces::mounts_for(workspaces, rec.host_id)?);
        let handshake = Handshake {
            chan,
            pid,
            trees,
            cgroup: rec.cgroup.clone(),
            host_id: rec.host_id,
            host_ip: rec.host_ip,
            mtu: self.host.mtu,
            publish: rec.ports.is_some(),
            proc_root: self.cfg.proc_root.clone(),
            job_id: rec.id.clone(),
            step: self.cfg.ready_timeout,
        };
        let (init_pid, done) = tokio::task::spawn_blocking(move || handshake.run())
            .await
            .map_err(|e| start_err(&rec.id, e))?;
        if init_pid.is_some() {
            rec.init_pid = init_pid;
            self.save_record(sb, rec)?;
        }
        done
    }

    /// Waits until dockerd answers `/_ping`, or ends, or the ready timeout
    /// passes.
    async fn wait_ready(&self, sb: &Sandbox) -> Result<(), SandboxError> {
        let socket = sb.socket();
        let deadline = Instant::now() + self.cfg.ready_timeout;
        let mut exited = sb.inner.exited.clone();
        loop {
            if ping::ping(&socket).await {
                return Ok(());
            }
            if let Some(code) = *exited.borrow() {
                return Err(start_err(
                    sb.id(),
                    format!("dockerd exited during start ({})", describe_exit(code)),
                ));
            }
            if Instant::now() > deadline {
                return Err(SandboxError::NotReady {
                    id: sb.id().into(),
                    timeout: self.cfg.ready_timeout,
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), exited.changed()).await;
        }
    }

    /// Loads the preloaded archives into the job, where they are not
    /// shared through the seed.
    async fn preload(&self, sb: &Sandbox, shared: bool) -> Result<(), SandboxError> {
        if shared {
            return Ok(());
        }
        for tar in &self.host.preloads {
            // A key's state may hold the archive's images already, under
            // the same names: loading it again would only read it.
            if sb.cache_hit() == Some(true) && self.holds(sb, tar).await {
                continue;
            }
            ping::load_image(&sb.socket(), tar)
                .await
                .map_err(|e| start_err(sb.id(), format!("preloading {}: {e}", tar.display())))?;
        }
        Ok(())
    }

    /// Whether the job has every image of the archive at `tar` under each
    /// of its names.
    async fn holds(&self, sb: &Sandbox, tar: &Path) -> bool {
        let tar = tar.to_path_buf();
        let Ok(Ok(images)) =
            tokio::task::spawn_blocking(move || crate::images::preload::images_in(&tar)).await
        else {
            return false;
        };
        for (id, names) in images {
            let names = if names.is_empty() {
                vec![id.clone()]
            } else {
                names
            };
            for name in names {
                if ping::image_id(&sb.socket(), &name).await.as_deref() != Some(id.as_str()) {
                    return false;
                }
            }
        }
        true
    }

    /// Writes `rec` to disk and to the live job.
    fn save_record(&self, sb: &Sandbox, rec: &JobRecord) -> Result<(), SandboxError> {
        rec.save(&self.cfg.state_dir)
            .map_err(io("cannot write record in", &sb.inner.dir))?;
        *sb.inner.record.locked() = rec.clone();
        Ok(())
    }
}

/// What a key's state keeps of the job that committed it and its next
/// job must not start with: the run's state (dockerd's exec-root, the
/// job's /tmp), and libnetwork's store of that run's networks. Every
/// network went with its containers before the commit; from a store that
/// still names the default bridge, dockerd removes the old one (and its
/// iptables rules) before making it anew, which costs a start about a
/// tenth of a second.
fn forget_the_last_run(root: &Path) -> Result<(), SandboxError> {
    for sub in ["exec", "tmp"] {
        let p = root.join(sub);
        match std::fs::remove_dir_all(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot empty", &p)(e)),
        }
    }
    let store = root.join("data/network/files/local-kv.db");
    match std::fs::remove_file(&store) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("cannot remove", &store)(e)),
    }
}

/// containerd's configuration where the job's init starts it: what dockerd
/// writes for the containerd it starts, with the same paths (its socket,
/// its state below the exec-root, its store below the data-root), and one
/// setting of berth's. containerd's garbage collector looks for work again
/// 49 times its average collection's time after the last one
/// (`pause_threshold` 0.02): a job's store is small, its collections take
/// well under a millisecond, and the idle containerd woke 65 times a
/// second (1.6; 27 for 1.7). With the threshold at 0 it looks once a
/// second (6 wakeups a second for both): what a job deletes is collected
/// within a second.
fn containerd_toml() -> String {
    use root::inside::{CONTAINERD_SOCKET, DATA_ROOT, STATE};
    format!(
        r#"version = 2
root = "{DATA_ROOT}/containerd/daemon"
state = "{STATE}/exec/containerd/daemon"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.0

[grpc]
  address = "{CONTAINERD_SOCKET}"

[debug]
  address = "{STATE}/exec/containerd/containerd-debug.sock"
"#
    )
}

/// Where a starting job's files are.
struct JobFiles {
    /// `<state>/jobs/<id>`.
    dir: PathBuf,
    /// The helper's, init's and dockerd's output.
    log: PathBuf,
}

/// The agent's side of a job's start, from the spawned stage-1 helper to a
/// started dockerd (see `protocol`). Blocking: it runs off the runtime.
struct Handshake {
    chan: protocol::AgentEnd,
    /// The stage-1 helper.
    pid: u32,
    trees: Vec<std::os::fd::OwnedFd>,
    cgroup: Option<JobCgroup>,
    host_id: u32,
    /// The link's host end, its MTU, and whether ports are published
    /// over it.
    host_ip: std::net::Ipv4Addr,
    mtu: u32,
    publish: bool,
    proc_root: PathBuf,
    job_id: String,
    /// Bound on each step.
    step: Duration,
}

impl Handshake {
    /// The job's init pid (once known) and how the start went: the job's
    /// network namespace when it did.
    fn run(self) -> (Option<u32>, Result<protocol::Namespaces, SandboxError>) {
        let mut init = None;
        let r = self.steps(&mut init);
        (init, r)
    }

    fn steps(mut self, init: &mut Option<u32>) -> Result<protocol::Namespaces, SandboxError> {
        let id = self.job_id.clone();
        let proto = |e: protocol::ProtocolError| match e {
            protocol::ProtocolError::Failed { message } => start_err(&id, message),
            e => start_err(&id, format!("stage-1 helper: {e}")),
        };
        // The helper goes into the job's delegated cgroups before it
        // creates the job's cgroup namespace, which is rooted there.
        if let Some(cg) = &self.cgroup {
            cg.attach(self.pid)?;
        }
        self.chan
            .start(&std::mem::take(&mut self.trees))
            .map_err(proto)?;
        let namespaces = self.chan.unshared(self.step).map_err(proto)?;
        // Namespaces exist: the helper, and the init it forks next, move to
        // their leaf; then ids and the link.
        if let Some(cg) = &self.cgroup {
            cg.settle(self.pid)?;
        }
        let map = format!("0 {} {}\n", self.host_id, config::RANGE_SIZE);
        for f in ["uid_map", "gid_map"] {
            let p = self.proc_root.join(self.pid.to_string()).join(f);
            std::fs::write(&p, &map).map_err(io("cannot write", &p))?;
        }
        net::create_link(
            &self.job_id,
            self.host_ip,
            self.mtu,
            self.publish,
            Some(self.pid),
        )?;
        self.chan.mapped().map_err(proto)?;
        // The helper names the init it forked; the init says when dockerd
        // runs. Either may come first.
        loop {
            match self
                .chan
                .recv("the job's init and dockerd", self.step)
                .map_err(proto)?
            {
                protocol::FromHelper::Init { pid } => *init = Some(pid),
                protocol::FromHelper::Ready if init.is_some() => return Ok(namespaces),
                protocol::FromHelper::Ready => {
                    // Ready before Init: the pid follows.
                    match self.chan.recv("init", self.step).map_err(proto)? {
                        protocol::FromHelper::Init { pid } => {
                            *init = Some(pid);
                            return Ok(namespaces);
                        }
                        other => return Err(proto(protocol::unexpected("init", &other))),
                    }
                }
                other => return Err(proto(protocol::unexpected("init or ready", &other))),
            }
        }
    }
}

/// The id map of a job's shared layer mounts: the seed's ids 0..65535
/// onto the job's range from `first`.
fn layers_idmap(first: u32) -> Result<IdmapNs, SandboxError> {
    let map = format!("0 {first} {}\n", config::RANGE_SIZE);
    Ok(IdmapNs::new(&map, &map)?)
}

/// Checks that an idmapped clone of `dir` can be made here.
fn probe_idmap(dir: &Path) -> Result<(), SandboxError> {
    let ns = layers_idmap(u32::MAX - config::RANGE_SIZE - 1)?;
    sys::idmapped_readonly_clone(dir, ns.fd())
        .map(drop)
        .map_err(|e| start_err("seed", e))
}

/// Every job's daemon.json. Container logs are capped (json-file, 3 files
/// of 10 MiB per container, the newest kept); a container may still ask for
/// other log options. From dockerd 24 on, networks the job creates get the
/// link's MTU (`--mtu` covers only the default bridge; older dockerds refuse
/// the key, and the job's TCP segment clamp covers them). The containerd
/// image store is dockerd's `containerd-snapshotter` feature.
fn daemon_json_text(
    mtu: u32,
    default_network_opts: bool,
    store: ImageStore,
    registries: &crate::images::registries::Loaded,
) -> String {
    let mut v = serde_json::json!({
        "log-driver": "json-file",
        "log-opts": { "max-size": "10m", "max-file": "3" },
    });
    if store == ImageStore::Containerd {
        v["features"] = serde_json::json!({ "containerd-snapshotter": true });
    }
    if !registries.mirrors.is_empty() {
        v["registry-mirrors"] = serde_json::json!(registries.mirrors);
    }
    if !registries.insecure.is_empty() {
        v["insecure-registries"] = serde_json::json!(registries.insecure);
    }
    if default_network_opts {
        v["default-network-opts"] =
            serde_json::json!({ "bridge": { "com.docker.network.driver.mtu": mtu.to_string() } });
    }
    format!("{v:#}\n")
}

/// The blocking part of [`Engine::attach_workspaces`]: every mount made
/// first, then attached in the helper's namespace, then bound in the job's
/// (one thread in each).
fn attach(sb: &Sandbox, host_id: u32, ws: &[Workspace]) -> Result<(), SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let id = sb.id();
    let trees = workspaces::mounts_for(ws, host_id)?;
    let mut mounts = sb.inner.mounts.locked();
    let m = mounts
        .as_mut()
        .ok_or_else(|| start_err(id, "the job's mount namespaces are not known"))?;
    let names: Vec<String> = (m.attached..m.attached + ws.len())
        .map(|n| n.to_string())
        .collect();
    m.attached += ws.len();
    let drop = sb.inner.dir.join("drop");
    sys::in_mntns(m.outer.as_fd(), || -> Result<(), SandboxError> {
        for (tree, name) in trees.iter().zip(&names) {
            let at = drop.join(name);
            mkdir_mode(&at, 0o700)?;
            sys::attach_tree(tree.as_fd(), &at).map_err(|e| start_err(id, e))?;
        }
        Ok(())
    })
    .map_err(|e| start_err(id, e))??;
    sys::in_mntns(m.job.as_fd(), || -> Result<(), SandboxError> {
        // The job's root is a tmpfs of its user namespace: mount points are
        // made there as the job's root.
        sys::set_thread_fs_ids(host_id, host_id).map_err(|e| start_err(id, e))?;
        for (w, name) in ws.iter().zip(&names) {
            let arrived = Path::new(root::inside::DROP).join(name);
            std::fs::create_dir_all(&w.at).map_err(io("cannot make", &w.at))?;
            sys::mount(
                &arrived.to_string_lossy(),
                &w.at,
                None,
                nix::mount::MsFlags::MS_BIND,
                None,
            )
            .map_err(|e| start_err(id, e))?;
            // What is there now must be the directory checked: a drop that
            // did not propagate would leave an empty directory instead.
            let md = std::fs::metadata(&w.at).map_err(io("cannot stat", &w.at))?;
            if (md.dev(), md.ino()) != w.id {
                return Err(start_err(
                    id,
                    format!("workspace {} did not reach the job", w.at.display()),
                ));
            }
        }
        Ok(())
    })
    .map_err(|e| start_err(id, e))?
}

/// Where the stage-1 helper attaches workspace `i` of the job whose
/// directory is `job_dir`.
fn workspace_mount_point(job_dir: &Path, i: usize) -> PathBuf {
    job_dir.join("workspaces").join(i.to_string())
}

fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().r#gen();
    format!("{:012x}", n & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_networks_get_the_link_mtu_where_dockerd_knows_how() {
        let old: serde_json::Value = serde_json::from_str(&daemon_json_text(
            1400,
            false,
            ImageStore::Classic,
            &Default::default(),
        ))
        .unwrap();
        assert!(old.get("default-network-opts").is_none());
        assert_eq!(old["log-opts"]["max-size"], "10m");
        let new: serde_json::Value = serde_json::from_str(&daemon_json_text(
            1400,
            true,
            ImageStore::Classic,
            &Default::default(),
        ))
        .unwrap();
        assert_eq!(
            new["default-network-opts"]["bridge"]["com.docker.network.driver.mtu"],
            "1400"
        );
        let reg = crate::images::registries::Loaded {
            mirrors: vec!["http://10.0.0.1:5000".into()],
            insecure: vec!["r.example:5000".into()],
            cas: Vec::new(),
        };
        let unknown: serde_json::Value =
            serde_json::from_str(&daemon_json_text(1400, false, ImageStore::Classic, &reg))
                .unwrap();
        assert!(unknown.get("default-network-opts").is_none());
        assert_eq!(unknown["registry-mirrors"][0], "http://10.0.0.1:5000");
        assert_eq!(unknown["insecure-registries"][0], "r.example:5000");
        assert!(unknown.get("features").is_none());
    }

    #[test]
    fn the_containerd_image_store_is_dockerds_snapshotter_feature() {
        let v: serde_json::Value = serde_json::from_str(&daemon_json_text(
            1400,
            true,
            ImageStore::Containerd,
            &Default::default(),
        ))
        .unwrap();
        assert_eq!(v["features"]["containerd-snapshotter"], true);
    }

    #[test]
    fn ids_are_12_hex() {
        let id = new_id();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(new_id(), new_id());
    }
}
