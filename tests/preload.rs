//! Base images preloaded into every new job, from a `docker save` archive and
//! from an OCI image layout, with no registry anywhere.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// An OCI image layout holding the busybox rootfs as one uncompressed layer.
fn oci_layout(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(&d), b).unwrap();
        d
    };
    let layer = busybox_tar();
    let l = put(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{l}"]}}}}"#
    );
    let c = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{l}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let m = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{m}","size":{},"annotations":{{"io.containerd.image.name":"oci-busybox:1"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
}

#[test]
fn every_new_job_has_the_preloaded_images() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    // A docker-save archive, made by a job of its own.
    let save = PathBuf::from("/var/lib/bt/preload-busybox-save.tar");
    {
        let e = engine(35, "preload-src");
        let sb = rt.block_on(e.start(None)).unwrap();
        import_busybox(&sb.socket());
        docker_ok(&sb.socket(), &["tag", "busybox:test", "saved-busybox:1"]);
        let out = docker(&sb.socket(), &["save", "saved-busybox:1"]);
        assert!(out.status.success());
        std::fs::write(&save, &out.stdout).unwrap();
        rt.block_on(e.teardown(sb.id())).unwrap();
    }
    let layout = PathBuf::from("/var/lib/bt/preload-oci/busybox");
    oci_layout(&layout);

    let mut cfg = engine_config(36, "preload");
    cfg.preload = vec![save.clone(), layout.clone()];
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    for sb in [&a, &b] {
        let images = docker_ok(
            &sb.socket(),
            &["images", "--format", "{{.Repository}}:{{.Tag}}"],
        );
        assert!(
            images.contains("saved-busybox:1") && images.contains("oci-busybox:1"),
            "{images}"
        );
        let o = docker_ok(
            &sb.socket(),
            &["run", "--rm", "oci-busybox:1", "echo", "from-oci"],
        );
        assert_eq!(o.trim(), "from-oci");
        let o = docker_ok(
            &sb.socket(),
            &["run", "--rm", "saved-busybox:1", "echo", "from-save"],
        );
        assert_eq!(o.trim(), "from-save");
    }
    // One job removing its copy changes nothing for the other.
    docker_ok(&a.socket(), &["rmi", "oci-busybox:1"]);
    assert!(docker_ok(&b.socket(), &["images"]).contains("oci-busybox"));
    rt.block_on(e.teardown(a.id())).unwrap();
    rt.block_on(e.teardown(b.id())).unwrap();

    // A corrupt layout is refused at agent start, naming the blob.
    let bad = PathBuf::from("/var/lib/bt/preload-oci/broken");
    oci_layout(&bad);
    let blob = std::fs::read_dir(bad.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap();
    std::fs::write(blob.path(), b"tampered").unwrap();
    drop(e);
    let mut cfg = engine_config(36, "preload");
    cfg.preload = vec![bad];
    let err = berth::sandbox::Engine::new(cfg)
        .err()
        .expect("corrupt layout")
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
}
