//! Foreign architectures in jobs: arm64 containers through the host's
//! emulation (qemu-user-static's binfmt_misc handlers), a binfmt_misc of
//! each job's own that tonistiigi/binfmt's sequence changes for that job
//! alone, and the classic binfmt escape tried from a `--privileged`
//! container. Runs as root; fails loudly when a prerequisite is missing.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use berth::sandbox::binfmt;
use berth::sandbox::{Engine, SandboxConfig, SandboxError, StartRequest};
use common::*;

/// The host's handlers, each entry's text by name: what no job may change.
fn host_handlers() -> BTreeMap<String, String> {
    std::fs::read_dir(binfmt::MOUNT)
        .unwrap()
        .flatten()
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), text)
        })
        .collect()
}

fn load_arm64(sock: &Path) {
    let o = docker_stdin(sock, &["load"], Some(&arm64_busybox_tar()));
    assert!(o.status.success(), "docker load: {}", text(&o));
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn uname_arm64(sock: &Path) -> Output {
    docker(sock, &["run", "--rm", ARM64_IMAGE, "uname", "-m"])
}

fn assert_arm64_runs(sock: &Path, what: &str) {
    let o = uname_arm64(sock);
    assert!(o.status.success(), "{what}: {}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "aarch64",
        "{what}"
    );
}

fn assert_arm64_fails(sock: &Path, what: &str) {
    let o = uname_arm64(sock);
    assert!(!o.status.success(), "{what}: arm64 still ran: {}", text(&o));
    assert!(
        text(&o).contains("exec format error"),
        "{what}: {}",
        text(&o)
    );
}

/// A `--privileged` container of the job behind `sock` running `script`
/// (busybox sh), as tonistiigi/binfmt's container runs.
fn privileged(sock: &Path, extra: &[&str], script: &str) -> Output {
    let mut args = vec!["run", "--rm", "--privileged"];
    args.extend_from_slice(extra);
    args.extend(["busybox:test", "sh", "-c", script]);
    docker(sock, &args)
}

fn privileged_ok(sock: &Path, extra: &[&str], script: &str) -> String {
    let o = privileged(sock, extra, script);
    assert!(o.status.success(), "{script}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// tonistiigi/binfmt's steps: mount binfmt_misc where it is not, change
/// it, unmount what it mounted.
fn binfmt_sequence(change: &str) -> String {
    format!(
        "set -e; m=/proc/sys/fs/binfmt_misc; mount -t binfmt_misc binfmt_misc $m; \
         {change}; umount $m"
    )
}

/// A file that starts with `magic` and is executed: on the host the kernel
/// must refuse it (no handler of the host's matches).
fn assert_host_refuses(magic: &str) {
    let file = std::env::temp_dir().join(format!("berth-binfmt-{magic}-{}", std::process::id()));
    std::fs::write(&file, magic).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ran = Command::new(&file).output();
    let _ = std::fs::remove_file(&file);
    assert!(
        ran.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOEXEC)),
        "the host ran a {magic} file through a job's handler: {ran:?}"
    );
}

/// The same in a `--privileged` container of the job behind `sock`: the
/// kernel refuses it (ENOEXEC) and the shell reads it as a script.
fn assert_job_refuses(sock: &Path, magic: &str) {
    let o = privileged(sock, &[], &run_magic(magic));
    assert!(
        !o.status.success(),
        "the job ran a {magic} file: {}",
        text(&o)
    );
    assert!(
        text(&o).contains(&format!("{magic}: not found")),
        "{}",
        text(&o)
    );
}

/// A script that makes a file starting with `magic` and executes it.
fn run_magic(magic: &str) -> String {
    format!("printf '{magic}' > /tmp/f && chmod +x /tmp/f && /tmp/f")
}

fn kernel_has_instances() {
    assert!(
        binfmt::own_instances(),
        "this kernel ({}) has no binfmt_misc instance per user namespace (Linux 6.7+): \
         these checks need one",
        berth::sandbox::fs::workspaces::kernel()
    );
}

#[test]
fn a_jobs_own_binfmt_misc_survives_tonistiigis_sequence_and_changes_that_job_alone() {
    if !prerequisites() {
        return;
    }
    kernel_has_instances();
    let arm64 = require_host_arm64();
    let before = host_handlers();
    let rt = rt();
    let e = engine(68, "emulation");
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    let (sa, sb) = (a.socket(), b.socket());
    for s in [&sa, &sb] {
        import_busybox(s);
        load_arm64(s);
        assert_arm64_runs(s, "a new job");
    }

    // The install half, as tonistiigi/binfmt runs it: mount, register an
    // emulator (here a handler of the job's own), unmount. Before berth
    // kept a mount of the job's instance, that unmount took every handler
    // of the job with it.
    let listed = privileged_ok(
        &sa,
        &[],
        &binfmt_sequence("ls $m; echo ':berth-test:M::BERTHTST::/bin/true:F' > $m/register"),
    );
    assert!(
        listed.lines().any(|l| l == arm64.name),
        "the job's instance holds the host's {}: {listed}",
        arm64.name
    );
    assert_arm64_runs(&sa, "after the install sequence");
    // The handler it registered is the job's: in another container of
    // the job, a matching file runs through it (busybox's `true`, opened at registration).
    privileged_ok(&sa, &[], &run_magic("BERTHTST"));

    // The uninstall half removes the job's arm64 handler: that job alone
    // loses it, on purpose.
    privileged_ok(
        &sa,
        &[],
        &binfmt_sequence(&format!("echo -1 > $m/{}", arm64.name)),
    );
    assert_arm64_fails(&sa, "after uninstalling in this job");
    assert_arm64_runs(&sb, "another job");
    assert_eq!(host_handlers(), before, "the host's handlers changed");

    // An emulator from the container's own file (tonistiigi/binfmt
    // carries its qemu builds), registered with F: it stays after the
    // unmount and the container's end.
    let Some(line) = arm64.register_line() else {
        panic!("{arm64:?}")
    };
    let line = String::from_utf8(line).unwrap();
    let interp = arm64.interpreter.display().to_string();
    let line = line.replace(&format!(":{interp}:"), ":/qemu-aarch64:");
    privileged_ok(
        &sa,
        &["-v", &format!("{interp}:/qemu-aarch64:ro")],
        &binfmt_sequence(&format!(
            "test -f /qemu-aarch64 || {{ echo \"the host handler's {interp} is not in the job's root\" >&2; exit 1; }}; \
             printf '%s' '{line}' > $m/register"
        )),
    );
    assert_arm64_runs(&sa, "after installing from the container's file");

    // Neither the host nor another job runs what job A registered.
    assert_host_refuses("BERTHTST");
    assert_job_refuses(&sb, "BERTHTST");
    assert_eq!(host_handlers(), before, "the host's handlers changed");

    for sb in [a, b] {
        rt.block_on(e.teardown(sb.id())).unwrap();
    }
    assert_eq!(host_handlers(), before, "the host's handlers changed");
}

/// The classic binfmt escape: a job registers a handler whose interpreter
/// is its own program (with F, opened at registration), for a magic any
/// file can start with. Neither the host nor another job may ever run it.
#[test]
fn a_handler_a_job_registers_never_runs_outside_it() {
    if !prerequisites() {
        return;
    }
    kernel_has_instances();
    let before = host_handlers();
    let rt = rt();
    let e = engine(69, "emulation-escape");
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    let (sa, sb) = (a.socket(), b.socket());
    for s in [&sa, &sb] {
        import_busybox(s);
    }
    let marker = std::env::temp_dir().join(format!("berth-escaped-{}", a.id()));
    let _ = std::fs::remove_file(&marker);
    // The interpreter writes a marker wherever it runs, then says so.
    let evil = format!(
        "printf '#!/bin/sh\\necho escaped > {m}; echo escaped\\n' > /evil && chmod +x /evil",
        m = marker.display()
    );
    let ran = privileged_ok(
        &sa,
        &[],
        &format!(
            "{evil}; {}; {}",
            binfmt_sequence("echo ':berth-escape:M::BERTHESC::/evil:F' > $m/register"),
            run_magic("BERTHESC")
        ),
    );
    // It works where it was registered: the checks below are not vacuous.
    assert_eq!(ran.trim(), "escaped");
    assert_host_refuses("BERTHESC");
    assert_job_refuses(&sb, "BERTHESC");
    assert!(!marker.exists(), "job A's interpreter ran on the host");
    assert_eq!(host_handlers(), before, "the host's handlers changed");
    for sb in [a, b] {
        rt.block_on(e.teardown(sb.id())).unwrap();
    }
}

/// What tonistiigi/binfmt's first step, mounting binfmt_misc, gets in a
/// job on this kernel: its own instance, holding the host's arm64 handler
/// (6.7 and later), or the kernel's refusal, the job running arm64 through
/// the host's handlers (Debian 12's 6.1). Either way arm64 runs, and the
/// host's handlers stay as they were.
#[test]
fn a_job_gets_what_its_kernel_gives_of_binfmt_misc() {
    if !prerequisites() {
        return;
    }
    let arm64 = require_host_arm64();
    let before = host_handlers();
    let rt = rt();
    let e = engine(73, "emulation-kernel");
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);
    load_arm64(&s);
    assert_arm64_runs(&s, "a new job");
    let o = privileged(&s, &[], &binfmt_sequence("ls $m"));
    if binfmt::own_instances() {
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).lines().any(|l| l == arm64.name), "{}", text(&o));
    } else {
        assert!(
            !o.status.success(),
            "a mount without an instance: {}",
            text(&o)
        );
        assert!(text(&o).contains("ermission denied"), "{}", text(&o));
    }
    assert_arm64_runs(&s, "after the attempt");
    rt.block_on(e.teardown(sb.id())).unwrap();
    assert_eq!(host_handlers(), before);
}

/// `host_emulation = false`: a job gets an empty instance of its own, and
/// arm64 binaries do not run in it; the host's handlers stay as they were.
#[test]
fn host_emulation_off_leaves_jobs_without_the_hosts_handlers() {
    if !prerequisites() {
        return;
    }
    kernel_has_instances();
    require_host_arm64();
    let before = host_handlers();
    let rt = rt();
    let cfg = SandboxConfig {
        host_emulation: false,
        ..engine_config(70, "emulation-off")
    };
    let e = Engine::new(cfg).expect("engine");
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);
    load_arm64(&s);
    assert_arm64_fails(&s, "host_emulation = false");
    let listed = privileged_ok(&s, &[], &binfmt_sequence("ls $m"));
    assert_eq!(
        listed.split_whitespace().collect::<Vec<_>>(),
        ["register", "status"]
    );
    rt.block_on(e.teardown(sb.id())).unwrap();
    // No job takes back what the agent's configuration is without.
    let asked = rt.block_on(e.start_for(StartRequest {
        emulation: Some(true),
        ..Default::default()
    }));
    match asked {
        Err(SandboxError::Config(c)) => assert!(c.to_string().contains("host_emulation"), "{c}"),
        Err(other) => panic!("a job asking for emulation: {other}"),
        Ok(sb) => panic!("a job got emulation on an agent without: {}", sb.id()),
    }
    assert_eq!(host_handlers(), before);
}

/// An arm64 image built in a job, from the local arm64 base, with the
/// CLI's default builder (BuildKit, through buildx), `buildx build
/// --load` and the legacy builder: each runs its `RUN` under emulation.
fn arm64_builds_in_a_job(e: Engine) {
    require_host_arm64();
    let rt = rt();
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    load_arm64(&s);
    let ctx = std::env::temp_dir().join(format!("berth-arm64-ctx-{}", sb.id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {ARM64_IMAGE}\nRUN uname -m > /built-on\nCMD [\"cat\", \"/built-on\"]\n"),
    )
    .unwrap();
    let ctx_arg = ctx.display().to_string();
    let builds: [(&str, Vec<&str>, Option<&str>); 3] = [
        (
            "default builder",
            vec!["build", "--platform", "linux/arm64", "-t", "built:default"],
            None,
        ),
        (
            "buildx --load",
            vec![
                "buildx",
                "build",
                "--platform",
                "linux/arm64",
                "--load",
                "-t",
                "built:buildx",
            ],
            None,
        ),
        (
            "legacy builder",
            vec!["build", "--platform", "linux/arm64", "-t", "built:legacy"],
            Some("0"),
        ),
    ];
    for (what, mut args, buildkit) in builds {
        let tag = args[args.len() - 1].to_string();
        args.push(&ctx_arg);
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", format!("unix://{}", s.display()))
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .args(&args);
        if let Some(v) = buildkit {
            c.env("DOCKER_BUILDKIT", v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{what}: {}", text(&o));
        let arch = docker_ok(
            &s,
            &["image", "inspect", "--format", "{{.Architecture}}", &tag],
        );
        assert_eq!(arch.trim(), "arm64", "{what}");
        let ran = docker_ok(&s, &["run", "--rm", &tag]);
        assert_eq!(ran.trim(), "aarch64", "{what}: RUN ran under emulation");
    }
    let _ = std::fs::remove_dir_all(&ctx);
    rt.block_on(e.teardown(sb.id())).unwrap();
}

#[test]
fn arm64_images_build_in_a_job() {
    if !prerequisites() {
        return;
    }
    arm64_builds_in_a_job(engine(71, "emulation-build"));
}

#[test]
fn arm64_images_build_in_a_job_on_debian13s_engine() {
    if !prerequisites() {
        return;
    }
    let cfg = with_debian13_engine(engine_config(72, "emulation-build13"));
    arm64_builds_in_a_job(Engine::new(cfg).expect("engine"));
}

/// A job may go without the host's emulators beside one that keeps them
/// (`berth job create --no-emulation`: the job API's `"emulation": false`).
/// In it arm64 binaries do not run, its binfmt_misc is empty, and its
/// engine's builder lists no arm64 platform: it no longer starts every
/// emulator on each build to find its platforms. Its neighbour runs arm64
/// and lists it, and the job list says which is which.
#[test]
fn a_job_may_go_without_emulation_beside_one_that_keeps_it() {
    if !prerequisites() {
        return;
    }
    kernel_has_instances();
    require_host_arm64();
    let before = host_handlers();
    let fd = FrontDoor::start(90, "emulation-per-job");
    let without = fd.create_job(&["--no-emulation"]);
    let with = fd.create_job(&[]);
    let platforms = |job: &TlsJob| {
        let out = docker_tls_ok(job, &["buildx", "inspect"]);
        out.lines()
            .find_map(|l| l.trim().strip_prefix("Platforms:"))
            .unwrap_or_else(|| panic!("no platforms in buildx inspect: {out}"))
            .split(',')
            .map(|p| p.trim().to_string())
            .collect::<Vec<_>>()
    };
    for (job, on) in [(&without, false), (&with, true)] {
        let what = if on {
            "the job with emulation"
        } else {
            "the job without"
        };
        import_busybox_tls(job);
        let o = docker_tls_stdin(job, &["load"], Some(&arm64_busybox_tar()));
        assert!(o.status.success(), "{what}: docker load: {}", text(&o));
        let o = docker_tls(job, &["run", "--rm", ARM64_IMAGE, "uname", "-m"]);
        let listed = platforms(job);
        let handlers = docker_tls_ok(
            job,
            &[
                "run",
                "--rm",
                "--privileged",
                "busybox:test",
                "sh",
                "-c",
                &binfmt_sequence("ls $m"),
            ],
        );
        if on {
            assert!(o.status.success(), "{what}: {}", text(&o));
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "aarch64");
            assert!(
                listed.iter().any(|p| p == "linux/arm64"),
                "{what}: {listed:?}"
            );
            assert!(
                handlers.split_whitespace().count() > 2,
                "{what}: {handlers}"
            );
        } else {
            assert!(!o.status.success(), "{what}: arm64 ran: {}", text(&o));
            assert!(
                text(&o).contains("exec format error"),
                "{what}: {}",
                text(&o)
            );
            assert!(
                !listed.iter().any(|p| p == "linux/arm64"),
                "{what}: {listed:?}"
            );
            assert!(
                listed.iter().any(|p| p == "linux/amd64"),
                "{what}: {listed:?}"
            );
            assert_eq!(
                handlers.split_whitespace().collect::<Vec<_>>(),
                ["register", "status"],
                "{what}"
            );
        }
    }
    let out = fd.job_cli(&["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (job, on) in [(&without, false), (&with, true)] {
        let v = jobs.iter().find(|v| v["id"] == job.id.as_str()).unwrap();
        assert_eq!(v["emulation"], on, "{v}");
    }
    drop(fd);
    assert_eq!(host_handlers(), before);
}
