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

fn du(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                n += du(&e.path());
            } else if md.is_file() {
                n += md.len();
            }
        }
    }
    n
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
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
    // Shared, not copied: the jobs' data-roots hold links, not layer content.
    let seed = Path::new("/var/lib/bt/preload/seed/data");
    assert!(
        seed.join("overlay2").is_dir(),
        "no shared image store was built"
    );
    let job_bytes = du(&e
        .config()
        .state_dir
        .join("jobs")
        .join(a.id())
        .join("root/data/overlay2"));
    let seed_bytes = du(&seed.join("overlay2"));
    assert!(seed_bytes > 1_000_000, "seed holds {seed_bytes} bytes");
    assert!(
        job_bytes < 64 * 1024,
        "job A holds {job_bytes} bytes of layers"
    );
    let seed_busybox = std::fs::read_dir(seed.join("overlay2"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("diff/bin/busybox"))
        .find(|p| p.exists())
        .expect("busybox in the seed");
    let before = sha(&std::fs::read(&seed_busybox).unwrap());

    // A job's writes to base-image files stay in that job.
    docker_ok(
        &a.socket(),
        &[
            "run",
            "--rm",
            "oci-busybox:1",
            "sh",
            "-c",
            "rm /bin/ls && echo mine > /bin/added",
        ],
    );
    let o = docker_ok(
        &b.socket(),
        &[
            "run",
            "--rm",
            "oci-busybox:1",
            "sh",
            "-c",
            "ls /bin/ls && ! test -e /bin/added && echo intact",
        ],
    );
    assert!(o.contains("intact"), "{o}");

    // Even a privileged container that enters the job's own mount namespace
    // cannot make a shared layer writable or write through it.
    // dockerd shares the job's mount namespace (the job's init is not
    // dumpable, so its namespaces cannot be opened at all).
    let layer = berth::sandbox::seed::layer_in_job(0);
    let script = format!(
        r#"exec nsenter -t "$(pidof dockerd)" -m sh -c '
        L={layer}
        test -x $L/bin/busybox && echo SEEN-LAYER
        mount -o remount,bind,rw $L 2>&1
        umount -l $L 2>&1 && echo UNMOUNTED
        echo tampered > $L/bin/tampered && echo WROTE-NEW
        echo tampered >> $L/bin/busybox && echo WROTE-OLD
        rm $L/bin/ls && echo REMOVED'"#,
        layer = layer.display()
    );
    let attack = docker(
        &a.socket(),
        &[
            "run",
            "--rm",
            "--privileged",
            "--pid",
            "host",
            "oci-busybox:1",
            "sh",
            "-c",
            &script,
        ],
    );
    let text = stdout(&attack);
    eprintln!("attack: {text}{}", String::from_utf8_lossy(&attack.stderr));
    assert!(
        text.contains("SEEN-LAYER"),
        "the attack never reached the shared layer: {text}"
    );
    assert!(
        !text.contains("WROTE") && !text.contains("REMOVED") && !text.contains("UNMOUNTED"),
        "changed a shared layer: {text}"
    );
    assert_eq!(
        sha(&std::fs::read(&seed_busybox).unwrap()),
        before,
        "the seed changed"
    );
    assert!(
        docker_ok(
            &b.socket(),
            &["run", "--rm", "oci-busybox:1", "ls", "/bin/ls"]
        )
        .contains("/bin/ls")
    );

    // One job removing the image changes nothing for the other.
    docker_ok(&a.socket(), &["rmi", "oci-busybox:1"]);
    assert!(docker_ok(&b.socket(), &["images"]).contains("oci-busybox"));
    assert!(seed_busybox.exists());
    // Nothing of the shared layers outlives a job: no mount, anywhere.
    let traces = Traces::capture(&e, &a);
    rt.block_on(e.teardown(a.id())).unwrap();
    traces.assert_gone();
    rt.block_on(e.teardown(b.id())).unwrap();
    drop(e);

    // Without sharing, every job loads the archives itself: same images.
    let mut cfg = engine_config(36, "preload");
    cfg.preload = vec![save.clone(), layout.clone()];
    cfg.share_preloads = false;
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let c = rt.block_on(e.start(None)).unwrap();
    let images = docker_ok(
        &c.socket(),
        &["images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(
        images.contains("saved-busybox:1") && images.contains("oci-busybox:1"),
        "{images}"
    );
    assert!(
        du(&e
            .config()
            .state_dir
            .join("jobs")
            .join(c.id())
            .join("root/data/overlay2"))
            > 1_000_000
    );
    rt.block_on(e.teardown(c.id())).unwrap();
    drop(e);

    // The containerd image store (Debian 13's engine) has no shared seed:
    // every job loads the archives into containerd's content store itself.
    let mut cfg = with_debian13_engine(engine_config(36, "preload"));
    cfg.preload = vec![save.clone(), layout.clone()];
    cfg.image_store = berth::sandbox::ImageStore::Containerd;
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let d = rt.block_on(e.start(None)).unwrap();
    let images = docker_ok(
        &d.socket(),
        &["images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(
        images.contains("saved-busybox:1") && images.contains("oci-busybox:1"),
        "{images}"
    );
    let o = docker_ok(
        &d.socket(),
        &["run", "--rm", "saved-busybox:1", "echo", "from-containerd"],
    );
    assert_eq!(o.trim(), "from-containerd");
    let data = e
        .config()
        .state_dir
        .join("jobs")
        .join(d.id())
        .join("root/data");
    assert!(du(&data.join("containerd")) > 1_000_000);
    assert!(!data.join("overlay2").exists() || du(&data.join("overlay2")) < 1_000_000);
    rt.block_on(e.teardown(d.id())).unwrap();

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
