//! Files the agent writes that a crash must never leave torn: key files,
//! job records, evidence; and the one test of a program file it will run.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` with mode `mode` through a temp file and rename,
/// so readers see the old or the new file, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Whether `p` is a regular file someone may execute.
pub fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a program named `name` would be found on the agent's PATH (the
/// system's when it has none), as spawning it by name finds it: without
/// running it.
pub fn on_path(name: &str) -> bool {
    let path =
        std::env::var_os("PATH").unwrap_or_else(|| crate::sandbox::engines::SYSTEM_PATH.into());
    find_on(name, &path).is_some()
}

/// The first executable named `name` in the directories of `path` (a
/// PATH-style list).
pub fn find_on(name: &str, path: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}
