//! Shared base images: the preloaded images live once, in a seed data-root,
//! and every job sees their layers without a copy.
//!
//! The seed is the data-root of a sandbox that loaded the preloads, taken
//! over after its dockerd stopped, with its ids shifted to 0..65535 on disk.
//! (Not immutable: overlayfs carries the flag up into the merged view, and
//! containers could no longer change their own copies of base files.) A new job gets a copy of dockerd's small metadata
//! (`image/`, and `overlay2/` minus layer contents) with its own ids; each
//! layer's `diff/` is a read-only idmapped mount of the seed's (the job's
//! user namespace maps 0..65535 onto its range), attached inside the job's
//! mount namespace only. Overlay writes of the job's containers go to their
//! own upper dirs; the seed never changes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::RANGE_SIZE;
use super::sys;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("shared images: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shared images: {0}")]
    Sys(#[from] sys::SysError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError + '_ {
    move |source| SeedError::Io {
        path: path.into(),
        source,
    }
}

/// The shared image store.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The seed data-root (ids 0..65535 on disk, immutable).
    pub data: PathBuf,
    /// Layer content dirs, relative to a data-root (`overlay2/<id>/diff`).
    pub layers: Vec<PathBuf>,
}

/// What of a data-root the seed keeps: image metadata and layers. Everything
/// else (containerd state, networks, volumes...) each job's dockerd makes anew.
const KEPT: [&str; 2] = ["image", "overlay2"];

fn walk(
    dir: &Path,
    f: &mut dyn FnMut(&Path, &std::fs::Metadata) -> Result<bool, SeedError>,
) -> Result<(), SeedError> {
    let md = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !f(dir, &md)? || !md.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        walk(&e.path(), f)?;
    }
    Ok(())
}

fn lchown_shift(path: &Path, md: &std::fs::Metadata, from: u32, to: u32) -> Result<(), SeedError> {
    let shift = |id: u32| -> u32 {
        if (from..from.saturating_add(RANGE_SIZE)).contains(&id) {
            id - from + to
        } else {
            // Ids outside the range (the overflow id) map to the range's last.
            to + RANGE_SIZE - 2
        }
    };
    std::os::unix::fs::lchown(path, Some(shift(md.uid())), Some(shift(md.gid()))).map_err(io(path))
}

fn layer_dirs(data: &Path) -> Result<Vec<PathBuf>, SeedError> {
    let o = data.join("overlay2");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&o) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name != "l" && e.path().join("diff").is_dir() {
                out.push(Path::new("overlay2").join(name).join("diff"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes a seed. Idempotent.
pub fn remove(dest: &Path) -> Result<(), SeedError> {
    if !dest.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dest).map_err(io(dest))
}

/// Turns a stopped sandbox's data-root (ids from `from`) into the seed at
/// `dest`.
pub fn adopt(data_root: &Path, dest: &Path, from: u32) -> Result<Seed, SeedError> {
    remove(dest)?;
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p).map_err(io(p))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).map_err(io(p))?;
    }
    std::fs::rename(data_root, dest).map_err(io(dest))?;
    for e in std::fs::read_dir(dest).map_err(io(dest))?.flatten() {
        if !KEPT.iter().any(|k| e.file_name() == *k) {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            } else {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
    }
    walk(dest, &mut |p, md| {
        lchown_shift(p, md, from, 0)?;
        Ok(true)
    })?;
    Ok(Seed {
        layers: layer_dirs(dest)?,
        data: dest.into(),
    })
}

/// Where shared layer `i` is mounted for the job whose directory is
/// `job_dir`. Not below the data-root: dockerd bind-mounts its data-root
/// onto itself (not recursively) at start, which would hide it.
pub fn layer_mount_point(job_dir: &Path, i: usize) -> PathBuf {
    job_dir.join("layers").join(i.to_string())
}

/// Where the job sees shared layer `i` (its private root binds the job's
/// `layers` directory there).
pub fn layer_in_job(i: usize) -> PathBuf {
    Path::new(super::fs::root::inside::LAYERS).join(i.to_string())
}

/// Writes the seed's metadata into a job's (empty) data-root with ids from
/// `to`; each layer's `diff` is a link to where the job sees that layer.
pub fn materialize(seed: &Seed, job_dir: &Path, job_data: &Path, to: u32) -> Result<(), SeedError> {
    for i in 0..seed.layers.len() {
        let m = layer_mount_point(job_dir, i);
        std::fs::create_dir_all(&m).map_err(io(&m))?;
    }
    walk(&seed.data, &mut |p, md| {
        let rel = p.strip_prefix(&seed.data).unwrap_or(p);
        let dst = job_data.join(rel);
        let ft = md.file_type();
        let layer = seed.layers.iter().position(|l| l == rel);
        let descend = if let Some(i) = layer {
            // A layer's content is mounted, never copied.
            std::os::unix::fs::symlink(layer_in_job(i), &dst).map_err(io(&dst))?;
            false
        } else if ft.is_dir() {
            if !rel.as_os_str().is_empty() {
                std::fs::create_dir(&dst).map_err(io(&dst))?;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))
                    .map_err(io(&dst))?;
            }
            true
        } else if ft.is_symlink() {
            let target = std::fs::read_link(p).map_err(io(p))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io(&dst))?;
            false
        } else if ft.is_file() {
            std::fs::copy(p, &dst).map_err(io(&dst))?;
            // The copy inherits the immutable source's mode, not its flags.
            false
        } else {
            return Ok(false);
        };
        if !rel.as_os_str().is_empty() {
            lchown_shift(&dst, md, 0, to)?;
        }
        Ok(descend)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialize_copies_metadata_but_not_layer_contents() {
        let base = std::env::temp_dir().join(format!("berth-seed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let seed = base.join("seed");
        std::fs::create_dir_all(seed.join("overlay2/abc/diff/bin")).unwrap();
        std::fs::create_dir_all(seed.join("overlay2/l")).unwrap();
        std::fs::create_dir_all(seed.join("image/overlay2/imagedb")).unwrap();
        std::fs::write(seed.join("overlay2/abc/link"), "SHORT").unwrap();
        std::fs::write(seed.join("overlay2/abc/diff/bin/big"), vec![0u8; 4096]).unwrap();
        std::fs::write(seed.join("image/overlay2/repositories.json"), "{}").unwrap();
        std::os::unix::fs::symlink("../abc/diff", seed.join("overlay2/l/SHORT")).unwrap();
        let s = Seed {
            layers: layer_dirs(&seed).unwrap(),
            data: seed.clone(),
        };
        assert_eq!(s.layers, vec![PathBuf::from("overlay2/abc/diff")]);
        let job = base.join("job");
        std::fs::create_dir_all(&job).unwrap();
        materialize(&s, &base, &job, 4242).unwrap();
        assert_eq!(
            std::fs::read_to_string(job.join("overlay2/abc/link")).unwrap(),
            "SHORT"
        );
        assert_eq!(
            std::fs::read_link(job.join("overlay2/abc/diff")).unwrap(),
            layer_in_job(0)
        );
        assert!(
            !job.join("overlay2/abc/diff/bin").exists(),
            "layer content was copied"
        );
        assert_eq!(
            std::fs::read_link(job.join("overlay2/l/SHORT")).unwrap(),
            PathBuf::from("../abc/diff")
        );
        let md = std::fs::symlink_metadata(job.join("image/overlay2/repositories.json")).unwrap();
        assert_eq!((md.uid(), md.gid()), (4242, 4242));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
