//! Base images for jobs without a registry: image archives configured once
//! for the agent and loaded into every new job before it is handed out.
//!
//! Two formats: a `docker save` tarball, used as it is, and an OCI image
//! layout directory (`oci-layout`, `index.json`, `blobs/`), read with
//! oci-spec and converted once, at agent start, to the docker-save format the
//! job's dockerd (20.10) loads. Blob digests are verified during conversion.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PreloadError {
    #[error("preload {path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("preload {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(path: &Path, why: impl Into<String>) -> PreloadError {
    PreloadError::Invalid {
        path: path.into(),
        why: why.into(),
    }
}

/// The images of a docker-save archive: each one's id (`sha256:` and its
/// config's digest) and the names it is loaded under. Reads the archive's
/// headers and its `manifest.json` alone, seeking past the layers.
pub fn images_in(tar: &Path) -> Result<Vec<(String, Vec<String>)>, PreloadError> {
    let io = |source| PreloadError::Io {
        path: tar.into(),
        source,
    };
    let file = std::fs::File::open(tar).map_err(io)?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries_with_seek().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        if entry.path().map_err(io)?.as_os_str() != "manifest.json" {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).map_err(io)?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
        }
        let entries: Vec<Entry> =
            serde_json::from_str(&text).map_err(|e| invalid(tar, format!("manifest.json: {e}")))?;
        return entries
            .into_iter()
            .map(|e| {
                // `<hex>.json` (docker save) or `blobs/sha256/<hex>` (OCI).
                let name = e.config.rsplit('/').next().unwrap_or_default();
                let hex = name.strip_suffix(".json").unwrap_or(name);
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        tar,
                        format!("manifest.json: config {:?}", e.config),
                    ));
                }
                Ok((format!("sha256:{hex}"), e.repo_tags.unwrap_or_default()))
            })
            .collect();
    }
    Err(invalid(tar, "no manifest.json: not a docker-save archive"))
}

/// Turns the configured paths into docker-save archives (converting OCI
/// layouts into `cache_dir`).
pub fn prepare(paths: &[PathBuf], cache_dir: &Path) -> Result<Vec<PathBuf>, PreloadError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
        } else if p.join("oci-layout").is_file() {
            std::fs::create_dir_all(cache_dir).map_err(|source| PreloadError::Io {
                path: cache_dir.into(),
                source,
            })?;
            let mut h = Sha256::new();
            h.update(p.to_string_lossy().as_bytes());
            let name = format!("oci-{:x}.tar", h.finalize());
            let tar = cache_dir.join(&name[..20]);
            convert_oci(p, &tar)?;
            out.push(tar);
        } else {
            return Err(invalid(
                p,
                "neither a `docker save` archive (a file) nor an OCI image layout (a directory with oci-layout and index.json)",
            ));
        }
    }
    Ok(out)
}

fn blob_path(layout: &Path, d: &Descriptor) -> Result<PathBuf, PreloadError> {
    let digest = d.digest();
    let alg = digest.algorithm().to_string();
    let hex = digest.digest();
    if alg != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(layout, format!("unsupported digest {digest}")));
    }
    Ok(layout.join("blobs").join(alg).join(hex))
}

/// The name:tag an index entry gives its image.
fn image_name(layout: &Path, d: &Descriptor) -> Option<String> {
    let ann = d.annotations().as_ref()?;
    if let Some(full) = ann.get("io.containerd.image.name") {
        return Some(full.clone());
    }
    let r = ann.get("org.opencontainers.image.ref.name")?;
    if r.contains(':') || r.contains('/') {
        return Some(r.clone());
    }
    // A bare tag: name the image after its layout directory.
    let base = layout.file_name()?.to_string_lossy().to_lowercase();
    Some(format!("{base}:{r}"))
}

/// Writes a docker-save archive for every image of an OCI layout.
pub fn convert_oci(layout: &Path, out: &Path) -> Result<(), PreloadError> {
    let index = ImageIndex::from_file(layout.join("index.json"))
        .map_err(|e| invalid(layout, format!("index.json: {e}")))?;
    let mut entries = Vec::new();
    let mut blobs: BTreeSet<PathBuf> = BTreeSet::new();
    for d in index.manifests() {
        let mpath = blob_path(layout, d)?;
        let manifest = ImageManifest::from_file(&mpath).map_err(|e| {
            invalid(
                layout,
                format!(
                    "manifest {}: {e} (nested indexes are not supported)",
                    d.digest()
                ),
            )
        })?;
        let name = |p: &Path| -> String {
            p.strip_prefix(layout)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        };
        let cfg = blob_path(layout, manifest.config())?;
        let mut layers = Vec::new();
        for l in manifest.layers() {
            let lp = blob_path(layout, l)?;
            layers.push(name(&lp));
            blobs.insert(lp);
        }
        blobs.insert(cfg.clone());
        let tags: Vec<String> = image_name(layout, d).into_iter().collect();
        entries.push(serde_json::json!({
            "Config": name(&cfg),
            "RepoTags": tags,
            "Layers": layers,
        }));
    }
    if entries.is_empty() {
        return Err(invalid(layout, "index.json lists no image"));
    }
    let tmp = out.with_extension("partial");
    let io = |source| PreloadError::Io {
        path: tmp.clone(),
        source,
    };
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let manifest_json = serde_json::to_vec(&entries).map_err(|e| invalid(layout, e.to_string()))?;
    append_bytes(&mut tar, "manifest.json", &manifest_json).map_err(io)?;
    for b in &blobs {
        verify_digest(layout, b)?;
        let rel = b.strip_prefix(layout).unwrap_or(b);
        tar.append_path_with_name(b, rel).map_err(io)?;
    }
    let mut w = tar.into_inner().map_err(io)?;
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(|source| PreloadError::Io {
        path: out.into(),
        source,
    })
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, name, data)
}

fn verify_digest(layout: &Path, blob: &Path) -> Result<(), PreloadError> {
    let want = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut f = std::fs::File::open(blob).map_err(|source| PreloadError::Io {
        path: blob.into(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|source| PreloadError::Io {
            path: blob.into(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = format!("{:x}", h.finalize());
    if got != want {
        return Err(invalid(
            layout,
            format!("blob {} is corrupt: its sha256 is {got}", blob.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        format!("{:x}", Sha256::digest(b))
    }

    /// A minimal layout with one image; returns its directory.
    fn layout(dir: &Path, corrupt: bool) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layer = b"not really a tar, but digests are what is checked".to_vec();
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let put = |b: &[u8]| {
            std::fs::write(dir.join("blobs/sha256").join(sha(b)), b).unwrap();
            sha(b)
        };
        let (l, c) = (put(&layer), put(&config));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{l}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let m = put(manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"1.0"}}}}]}}"#,
            manifest.len()
        );
        std::fs::write(dir.join("index.json"), index).unwrap();
        if corrupt {
            std::fs::write(dir.join("blobs/sha256").join(&l), b"tampered").unwrap();
        }
    }

    #[test]
    fn converts_a_layout_to_a_docker_save_archive() {
        let base = std::env::temp_dir().join(format!("berth-oci-{}", std::process::id()));
        let dir = base.join("myimage");
        layout(&dir, false);
        let out = base.join("out.tar");
        convert_oci(&dir, &out).unwrap();
        let mut a = tar::Archive::new(std::fs::File::open(&out).unwrap());
        let mut names = Vec::new();
        let mut manifest = String::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let n = e.path().unwrap().to_string_lossy().into_owned();
            if n == "manifest.json" {
                e.read_to_string(&mut manifest).unwrap();
            }
            names.push(n);
        }
        assert_eq!(names.len(), 3, "{names:?}");
        let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        assert_eq!(m[0]["RepoTags"][0], "myimage:1.0");
        assert!(
            m[0]["Config"]
                .as_str()
                .unwrap()
                .starts_with("blobs/sha256/")
        );
        // What a job is asked for before it loads the archive again.
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert_eq!(
            images_in(&out).unwrap(),
            [(
                format!("sha256:{}", sha(config)),
                vec!["myimage:1.0".to_string()]
            )]
        );
        let bare = base.join("bare.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&bare).unwrap());
        append_bytes(&mut b, "layer.tar", b"x").unwrap();
        b.finish().unwrap();
        drop(b);
        assert!(
            images_in(&bare)
                .unwrap_err()
                .to_string()
                .contains("no manifest.json")
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn corrupt_blobs_and_unknown_paths_are_refused() {
        let base = std::env::temp_dir().join(format!("berth-oci-bad-{}", std::process::id()));
        let dir = base.join("img");
        layout(&dir, true);
        let e = convert_oci(&dir, &base.join("o.tar"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupt"), "{e}");
        let e = prepare(&[base.join("nothing-here")], &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
