//! cgroup v1: one directory per hierarchy, placed below each hierarchy's
//! root. cpuset needs its `cpus` and `mems` copied down before it takes tasks.

use std::path::Path;

use super::{CgroupError, DELEGATED, Hierarchy, chown, cpu_quota, mkdir, read, write};
use crate::sandbox::config::Limits;

/// Creates `parent` (shared by all jobs) in every hierarchy.
pub fn prepare(hierarchies: &[Hierarchy], parent: &str) -> Result<(), CgroupError> {
    for h in hierarchies {
        let mut dir = h.mount.clone();
        for comp in Path::new(parent).components() {
            dir.push(comp);
            mkdir(&dir)?;
            if h.has("cpuset") {
                inherit_cpuset(&dir)?;
            }
        }
    }
    Ok(())
}

pub fn create(
    hierarchies: &[Hierarchy],
    rel: &Path,
    limits: &Limits,
    uid: u32,
    gid: u32,
) -> Result<(), CgroupError> {
    for h in hierarchies {
        let dir = h.mount.join(rel);
        mkdir(&dir)?;
        let child = dir.join(DELEGATED);
        mkdir(&child)?;
        if h.has("cpuset") {
            inherit_cpuset(&dir)?;
            inherit_cpuset(&child)?;
        }
        if h.has("memory")
            && let Some(m) = limits.memory_bytes
        {
            write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
        }
        if h.has("pids")
            && let Some(p) = limits.pids
        {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if h.has("cpu")
            && let Some(c) = limits.cpus
        {
            write(&dir.join("cpu.cfs_period_us"), "100000")?;
            write(&dir.join("cpu.cfs_quota_us"), &cpu_quota(c).to_string())?;
        }
        for f in ["", "cgroup.procs", "tasks"] {
            chown(&child.join(f), uid, gid)?;
        }
    }
    Ok(())
}

/// cpuset refuses tasks until `cpus` and `mems` are set: copy them down.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        if read(&dir.join(f))?.trim().is_empty() {
            write(&dir.join(f), read(&parent.join(f))?.trim())?;
        }
    }
    Ok(())
}
