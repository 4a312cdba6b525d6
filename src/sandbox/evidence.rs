//! What a failed job start leaves for a person to read: the job's log
//! (stage-1 helper, init and dockerd) is copied to `<state>/failed/<id>.log`
//! before teardown removes the job's directory, capped in size, and only the
//! newest few are kept.

use std::path::{Path, PathBuf};

/// Bytes kept of one failed start's log (its end).
const MAX_BYTES: u64 = 256 * 1024;
/// Failed starts whose logs are kept.
const KEEP: usize = 10;
/// Lines of the log quoted in the error.
const TAIL_LINES: usize = 8;

pub fn failed_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("failed")
}

/// A kept log and its last lines.
#[derive(Debug, Clone)]
pub struct Kept {
    pub path: PathBuf,
    pub tail: String,
}

/// Keeps the end of `log` as `<state>/failed/<id>.log` (0600) and prunes
/// older ones. None when there is no log or it cannot be kept.
pub fn keep(state_dir: &Path, id: &str, log: &Path) -> Option<Kept> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    let skip = len.saturating_sub(MAX_BYTES);
    f.seek(SeekFrom::Start(skip)).ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    let dir = failed_dir(state_dir);
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{id}.log"));
    crate::files::write_atomic(&path, &bytes, 0o600).ok()?;
    prune(&dir, KEEP);
    Some(Kept {
        tail: tail(&String::from_utf8_lossy(&bytes), TAIL_LINES),
        path,
    })
}

/// The last `n` non-empty lines of `text`, each indented.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Removes all but the newest `keep` logs in `dir`.
fn prune(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort_by_key(|l| std::cmp::Reverse(l.0));
    for (_, p) in logs.into_iter().skip(keep) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_end_of_the_log_and_only_the_newest() {
        let state = std::env::temp_dir().join(format!("berth-evidence-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        let log = state.join("dockerd.log");
        let mut text = "x".repeat(MAX_BYTES as usize);
        text.push_str("\nlevel=info msg=starting\n\nberth sandbox: enable controllers: busy\n");
        std::fs::write(&log, &text).unwrap();
        let k = keep(&state, "j0", &log).unwrap();
        assert!(
            k.tail
                .ends_with("    berth sandbox: enable controllers: busy"),
            "{}",
            k.tail
        );
        assert!(k.tail.contains("msg=starting"));
        assert_eq!(std::fs::metadata(&k.path).unwrap().len(), MAX_BYTES);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&k.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        for i in 1..=KEEP + 3 {
            keep(&state, &format!("j{i}"), &log).unwrap();
        }
        assert_eq!(std::fs::read_dir(failed_dir(&state)).unwrap().count(), KEEP);
        assert!(keep(&state, "none", &state.join("missing.log")).is_none());
        std::fs::remove_dir_all(&state).unwrap();
    }
}
