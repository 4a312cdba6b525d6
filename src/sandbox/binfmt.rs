//! Emulation of foreign architectures in jobs: the host's binfmt_misc
//! handlers, read once at start, and a binfmt_misc instance of each job's
//! own that holds copies of them.
//!
//! Since Linux 6.7 binfmt_misc has an instance per user namespace: a
//! namespace that mounts one uses its own handlers and no longer its
//! ancestors', and unmounting an instance's last mount deletes its
//! handlers. A job that ran tonistiigi/binfmt's sequence (mount, register,
//! unmount) in a container would otherwise leave itself without emulation
//! until it ends. So the job's init mounts the job's instance before the
//! job's root is entered, registers the host's handlers in it (a handler
//! with the F flag opens its interpreter there and then, from the host's
//! tree, so no image needs the interpreter inside), and keeps that mount
//! for the job's life: what a container registers or removes later changes
//! that job alone. Kernels before 6.7 refuse the mount in a user namespace;
//! there the job uses the host's handlers.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use super::sys;

/// Why a job cannot go without the host's handlers on this kernel.
pub fn needs_own_instances() -> String {
    format!(
        "needs binfmt_misc instances per user namespace (Linux 6.7 or later; this is {}): \
         here every job runs foreign binaries through the host's handlers",
        super::fs::workspaces::kernel()
    )
}

/// Where binfmt_misc is mounted, on the host and in a job.
pub const MOUNT: &str = "/proc/sys/fs/binfmt_misc";

/// How a handler recognises its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Match {
    /// `mask` (when set) applied to the bytes at `offset`, compared with
    /// `magic`.
    Magic {
        offset: u32,
        magic: Vec<u8>,
        mask: Option<Vec<u8>>,
    },
    /// The file name's extension, without the dot.
    Extension(String),
}

/// One binfmt_misc handler, as `/proc/sys/fs/binfmt_misc/NAME` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handler {
    pub name: String,
    pub enabled: bool,
    pub interpreter: PathBuf,
    /// The kernel's letters: P (preserve argv[0]), O (open binary),
    /// C (credentials), F (fix binary: the interpreter is opened when the
    /// handler is registered).
    pub flags: String,
    pub matches: Match,
}

#[derive(Debug, thiserror::Error)]
pub enum BinfmtError {
    #[error("binfmt_misc entry {name}: {what}")]
    Entry { name: String, what: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Handler {
    /// Parses an entry file's text (the kernel's `entry_status`).
    pub fn parse(name: &str, text: &str) -> Result<Handler, BinfmtError> {
        let bad = |what: &str| BinfmtError::Entry {
            name: name.into(),
            what: what.into(),
        };
        let mut lines = text.lines();
        let enabled = match lines.next() {
            Some("enabled") => true,
            Some("disabled") => false,
            _ => return Err(bad("no enabled/disabled line")),
        };
        let (mut interpreter, mut flags) = (None, String::new());
        let (mut offset, mut magic, mut mask, mut extension) = (0, None, None, None);
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "interpreter" => interpreter = Some(PathBuf::from(value)),
                "flags:" => flags = value.trim().to_string(),
                "offset" => offset = value.parse().map_err(|_| bad("bad offset"))?,
                "magic" => magic = Some(hex(value).ok_or_else(|| bad("bad magic"))?),
                "mask" => mask = Some(hex(value).ok_or_else(|| bad("bad mask"))?),
                "extension" => extension = Some(value.trim_start_matches('.').to_string()),
                _ => {}
            }
        }
        let matches = match (magic, extension) {
            (Some(magic), None) => Match::Magic {
                offset,
                magic,
                mask,
            },
            (None, Some(ext)) => Match::Extension(ext),
            _ => return Err(bad("neither a magic nor an extension")),
        };
        Ok(Handler {
            name: name.into(),
            enabled,
            interpreter: interpreter.ok_or_else(|| bad("no interpreter"))?,
            flags,
            matches,
        })
    }

    /// Whether the interpreter is opened at registration (the F flag).
    pub fn fixed(&self) -> bool {
        self.flags.contains('F')
    }

    /// The line written to `register`: `:name:type:offset:magic:mask:
    /// interpreter:flags`, every magic and mask byte escaped (`\xHH`), so a
    /// `:` among them stays a byte. None when a field cannot be written
    /// (a `:` or newline in the name or the interpreter's path).
    pub fn register_line(&self) -> Option<Vec<u8>> {
        let interp = self.interpreter.to_str()?;
        let plain = |s: &str| !s.is_empty() && !s.contains([':', '\n', '/']);
        if !plain(&self.name) || interp.contains([':', '\n']) || !interp.starts_with('/') {
            return None;
        }
        let flags: String = self.flags.chars().filter(|c| "POCF".contains(*c)).collect();
        let line = match &self.matches {
            Match::Magic {
                offset,
                magic,
                mask,
            } => format!(
                ":{}:M:{offset}:{}:{}:{interp}:{flags}",
                self.name,
                escaped(magic),
                mask.as_deref().map(escaped).unwrap_or_default(),
            ),
            Match::Extension(ext) => {
                if !plain(ext) {
                    return None;
                }
                format!(":{}:E::{ext}::{interp}:{flags}", self.name)
            }
        };
        Some(line.into_bytes())
    }

    /// The architecture an ELF magic names (`e_machine`), for reports.
    pub fn arch(&self) -> Option<&'static str> {
        let Match::Magic {
            offset: 0, magic, ..
        } = &self.matches
        else {
            return None;
        };
        if magic.len() < 20 || !magic.starts_with(b"\x7fELF") {
            return None;
        }
        let big = magic[5] == 2;
        let machine = if big {
            u16::from_be_bytes([magic[18], magic[19]])
        } else {
            u16::from_le_bytes([magic[18], magic[19]])
        };
        let bits64 = magic[4] == 2;
        // Go's names, as docker's `--platform` writes them.
        Some(match (machine, bits64, big) {
            (3, _, _) => "386",
            (62, _, _) => "amd64",
            (40, _, false) => "arm",
            (40, _, true) => "armbe",
            (183, _, _) => "arm64",
            (243, true, _) => "riscv64",
            (243, false, _) => "riscv32",
            (21, true, false) => "ppc64le",
            (21, true, true) => "ppc64",
            (20, _, _) => "ppc",
            (22, _, _) => "s390x",
            (8, true, false) => "mips64le",
            (8, true, true) => "mips64",
            (8, false, false) => "mipsle",
            (8, false, true) => "mips",
            (258, _, _) => "loong64",
            (2, _, _) | (43, _, _) => "sparc64",
            _ => return None,
        })
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn escaped(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\x{b:02x}")).collect()
}

/// The handlers registered in the binfmt_misc mounted at `dir` (the host's:
/// [`MOUNT`]), by name. An unmounted or missing directory has none.
pub fn handlers(dir: &Path) -> Result<Vec<Handler>, BinfmtError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(BinfmtError::Read {
                path: dir.into(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "register" || name == "status" {
            continue;
        }
        let path = e.path();
        let text = std::fs::read_to_string(&path).map_err(|source| BinfmtError::Read {
            path: path.clone(),
            source,
        })?;
        out.push(Handler::parse(&name, &text)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Whether this kernel gives a user namespace a binfmt_misc instance of
/// its own (Linux 6.7 and later), tried once per process in a throwaway
/// namespace: the kernel cannot change its mind while we run.
pub fn own_instances() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(sys::userns_mounts_binfmt)
}

/// The job's own instance, mounted below the job's new root `new_root`
/// (whose /proc is mounted) and kept there for the job's life, with
/// `handlers` registered in it. Run by the job's init before it enters the
/// new root: a handler with the F flag opens its interpreter from the
/// host's tree. A handler the instance refuses is reported and skipped;
/// the rest still register.
pub fn install(new_root: &Path, handlers: &[Handler]) -> Result<Vec<String>, String> {
    let at = new_root.join(MOUNT.trim_start_matches('/'));
    sys::mount(
        "binfmt_misc",
        &at,
        Some("binfmt_misc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )
    .map_err(|e| format!("mounting the job's binfmt_misc: {e}"))?;
    let mut refused = Vec::new();
    for h in handlers {
        let Some(line) = h.register_line() else {
            refused.push(format!("{}: cannot be written as a register line", h.name));
            continue;
        };
        if let Err(e) = std::fs::write(at.join("register"), &line) {
            refused.push(format!("{} ({}): {e}", h.name, h.interpreter.display()));
        }
    }
    Ok(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian 12's qemu-user-static registers for arm64 shows.
    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n\
        flags: POCF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\n\
        mask ffffffffffffff00fffffffffffffffffeffffff\n";

    #[test]
    fn an_entry_reads_back_as_the_line_that_registers_it() {
        let h = Handler::parse("qemu-aarch64", AARCH64).unwrap();
        assert!(h.enabled && h.fixed());
        assert_eq!(h.arch(), Some("arm64"));
        assert_eq!(
            h.interpreter,
            Path::new("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
        );
        let line = String::from_utf8(h.register_line().unwrap()).unwrap();
        assert!(line.starts_with(":qemu-aarch64:M:0:\\x7f\\x45\\x4c\\x46\\x02"));
        assert!(line.ends_with(":/usr/libexec/qemu-binfmt/aarch64-binfmt-P:POCF"));
        // Seven colons: a `:` byte in the magic (0x3a) would be escaped.
        assert_eq!(line.matches(':').count(), 7);
        let ext = Handler::parse(
            "jar",
            "disabled\ninterpreter /usr/bin/jexec\nflags: \nextension .jar\n",
        )
        .unwrap();
        assert!(!ext.enabled && !ext.fixed() && ext.arch().is_none());
        assert_eq!(
            ext.register_line().unwrap(),
            b":jar:E::jar::/usr/bin/jexec:".to_vec()
        );
    }

    #[test]
    fn what_cannot_be_written_back_is_refused() {
        assert!(Handler::parse("x", "maybe\n").is_err());
        assert!(Handler::parse("x", "enabled\ninterpreter /i\nflags: F\n").is_err());
        assert!(Handler::parse("x", "enabled\ninterpreter /i\nmagic 7g\n").is_err());
        let mut h = Handler::parse("qemu-aarch64", AARCH64).unwrap();
        h.interpreter = PathBuf::from("/opt/a:b");
        assert!(h.register_line().is_none());
        h.interpreter = PathBuf::from("relative");
        assert!(h.register_line().is_none());
    }

    #[test]
    fn a_missing_mount_has_no_handlers() {
        assert!(
            handlers(Path::new("/nonexistent/binfmt"))
                .unwrap()
                .is_empty()
        );
    }
}
