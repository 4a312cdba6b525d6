//! The sandbox engine against the real dockerd, with the real docker CLI as
//! the client. Runs as root (CI does); fails loudly when a prerequisite is
//! missing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth::sandbox::{Limits, SandboxError, Status};
use common::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn docker_run_build_networks_and_cgroup_features_work_inside_a_job() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(1, "features");
    assert!(e.delegates_cgroups(), "this host can delegate cgroups");
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);

    // Ordinary mode with the cgroupfs driver (not --rootless).
    let info = docker_ok(&s, &["info", "--format", "{{.CgroupDriver}} {{.Driver}}"]);
    assert_eq!(info.trim(), "cgroupfs overlay2");
    let who = docker_ok(
        &s,
        &["run", "--rm", "busybox:test", "sh", "-c", "id -u; hostname"],
    );
    assert!(who.starts_with("0\n"), "{who}");

    // A two-stage build with the legacy builder.
    let ctx = std::env::temp_dir().join(format!("berth-build-{}", std::process::id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test AS build\nRUN echo built-in-stage-one > /artifact\n\
         FROM busybox:test\nCOPY --from=build /artifact /artifact\nCMD [\"cat\", \"/artifact\"]\n",
    )
    .unwrap();
    docker_ok(
        &s,
        &["build", "-q", "-t", "app:test", ctx.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(&ctx);
    assert_eq!(
        docker_ok(&s, &["run", "--rm", "app:test"]).trim(),
        "built-in-stage-one"
    );

    // A user-defined network: two containers talk by name.
    docker_ok(&s, &["network", "create", "appnet"]);
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--net",
            "appnet",
            "--name",
            "server",
            "busybox:test",
            "sh",
            "-c",
            "while true; do echo hello-from-server | nc -l -p 7000; done",
        ],
    );
    let mut got = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        got = stdout(&docker(
            &s,
            &[
                "run",
                "--rm",
                "--net",
                "appnet",
                "busybox:test",
                "nc",
                "server",
                "7000",
            ],
        ));
        if got.contains("hello-from-server") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(got.contains("hello-from-server"), "client got {got:?}");

    // docker top, pause/unpause, stats with a real per-container limit.
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--name",
            "sleeper",
            "--memory",
            "64m",
            "busybox:test",
            "sleep",
            "300",
        ],
    );
    assert!(docker_ok(&s, &["top", "sleeper"]).contains("sleep 300"));
    docker_ok(&s, &["pause", "sleeper"]);
    assert_eq!(
        docker_ok(&s, &["inspect", "-f", "{{.State.Status}}", "sleeper"]).trim(),
        "paused"
    );
    docker_ok(&s, &["unpause", "sleeper"]);
    let stats = docker_ok(
        &s,
        &[
            "stats",
            "--no-stream",
            "--format",
            "{{.MemUsage}}",
            "sleeper",
        ],
    );
    assert!(stats.contains("64MiB"), "stats shows the limit: {stats}");

    // --memory is enforced: 200 MB in a 64 MB container is OOM-killed.
    let hog = docker(
        &s,
        &[
            "run",
            "--rm",
            "--memory",
            "64m",
            "--memory-swap",
            "64m",
            "busybox:test",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=200M",
            "count=1",
        ],
    );
    assert_eq!(hog.status.code(), Some(137), "hog: {}", stderr(&hog));
    // --pids-limit is enforced.
    let forks = docker(
        &s,
        &[
            "run",
            "--rm",
            "--pids-limit",
            "8",
            "busybox:test",
            "sh",
            "-c",
            "for i in $(seq 1 20); do sleep 5 & done; wait",
        ],
    );
    assert!(
        stderr(&forks).contains("fork") || stderr(&forks).contains("resource"),
        "pids: {}",
        stderr(&forks)
    );
    // --cpus is written as a CFS quota on the container's cgroup.
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--name",
            "capped",
            "--cpus",
            "0.5",
            "busybox:test",
            "sleep",
            "300",
        ],
    );
    let cid = docker_ok(&s, &["inspect", "-f", "{{.Id}}", "capped"]);
    let quota = container_cgroup_file(&sb, &cid, ("cpu", "cpu.cfs_quota_us"), "cpu.max");
    let quota = std::fs::read_to_string(&quota).unwrap_or_else(|e| panic!("{quota:?}: {e}"));
    assert!(
        quota.trim() == "50000" || quota.trim() == "50000 100000",
        "--cpus 0.5 became {quota:?}"
    );
    // --memory is written on the container's own cgroup, inside the job's.
    let sleeper = docker_ok(&s, &["inspect", "-f", "{{.Id}}", "sleeper"]);
    let mem = container_cgroup_file(
        &sb,
        &sleeper,
        ("memory", "memory.limit_in_bytes"),
        "memory.max",
    );
    let mem = std::fs::read_to_string(&mem).unwrap_or_else(|e| panic!("{mem:?}: {e}"));
    assert_eq!(mem.trim(), (64u64 << 20).to_string());

    // Nothing of the job listens in the host's network namespace.
    let range = sb.record().host_id..sb.record().host_id + 65536;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(f).unwrap().lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let uid: u32 = w[7].parse().unwrap();
            assert!(
                !(w[3] == "0A" && range.contains(&uid)),
                "job listens on the host: {line}"
            );
        }
    }

    rt.block_on(e.teardown(sb.id())).unwrap();
}

#[test]
fn a_job_cannot_touch_the_host_nor_raise_its_limits() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(2, "isolation");
    let limits = Limits {
        memory_bytes: Some(600 << 20),
        pids: Some(2000),
        cpus: None,
        disk_bytes: None,
    };
    let sb = rt.block_on(e.start(Some(limits))).unwrap();
    let s = sb.socket();
    import_busybox(&s);

    // The host's system directories are in the job's root read-only, and
    // host root's files appear as nobody's: /usr is not writable.
    let marker = format!("berth-escape-{}", sb.id());
    let out = docker(
        &s,
        &[
            "run",
            "--rm",
            "-v",
            "/:/host",
            "busybox:test",
            "touch",
            &format!("/host/usr/{marker}"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    assert!(!Path::new("/usr").join(&marker).exists());
    // The job's /etc is its own: what it writes there stays there.
    docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "-v",
            "/:/host",
            "busybox:test",
            "touch",
            &format!("/host/etc/{marker}"),
        ],
    );
    assert!(!Path::new("/etc").join(&marker).exists());
    let out = docker(
        &s,
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            "/:/host",
            "busybox:test",
            "sh",
            "-c",
            &format!("mount -o remount,rw /host/usr; echo x > /host/usr/{marker}"),
        ],
    );
    assert!(!out.status.success());
    assert!(!Path::new("/usr").join(&marker).exists());

    // The host's /run (where a docker.sock would live) is not the job's.
    let host_marker = Path::new("/run").join(format!("berth-host-marker-{}", sb.id()));
    std::fs::write(&host_marker, "host").unwrap();
    let ls = docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "-v",
            "/run:/hostrun",
            "busybox:test",
            "ls",
            "/hostrun",
        ],
    );
    std::fs::remove_file(&host_marker).unwrap();
    assert!(!ls.contains("berth-host-marker"), "host /run visible: {ls}");

    // A privileged container cannot reach the host's block devices.
    let (major, minor) = root_device();
    let out = docker(
        &s,
        &[
            "run",
            "--rm",
            "--privileged",
            "busybox:test",
            "sh",
            "-c",
            &format!("mknod /tmp/disk b {major} {minor} && mount /tmp/disk /mnt && echo MOUNTED"),
        ],
    );
    assert!(
        !stdout(&out).contains("MOUNTED"),
        "mounted the host disk: {}",
        stdout(&out)
    );
    // Nor the host's sysrq trigger ('h' only prints help, if it ever got through).
    let out = docker(
        &s,
        &[
            "run",
            "--rm",
            "--privileged",
            "busybox:test",
            "sh",
            "-c",
            "echo h > /proc/sysrq-trigger && echo WROTE",
        ],
    );
    assert!(!stdout(&out).contains("WROTE"), "wrote sysrq-trigger");

    // The job's disk is mounted without nodev (BuildKit's read-only
    // remounts need it): no device node can exist on it. A privileged
    // container cannot make one, on its own root or on a volume...
    for target in ["/null-here", "/v/null-here"] {
        let out = docker(
            &s,
            &[
                "run",
                "--rm",
                "--privileged",
                "-v",
                "devtest:/v",
                "busybox:test",
                "sh",
                "-c",
                &format!("mknod {target} c 1 3 && echo MADE"),
            ],
        );
        assert!(
            !stdout(&out).contains("MADE")
                && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "made a device node at {target} on the job's disk: {out:?}"
        );
    }
    // ...and an image whose layer holds one unpacks without it.
    let layer = std::env::temp_dir().join(format!("berth-devlayer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&layer);
    std::fs::create_dir_all(layer.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
    nix::sys::stat::mknod(
        &layer.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let tar = Command::new("tar")
        .args(["-C", layer.to_str().unwrap(), "-c", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    std::fs::remove_dir_all(&layer).unwrap();
    let import = docker_stdin(&s, &["import", "-", "devlayer:1"], Some(&tar.stdout));
    if import.status.success() {
        let out = docker(
            &s,
            &[
                "run",
                "--rm",
                "devlayer:1",
                "/bin/busybox",
                "sh",
                "-c",
                "test -c /null && echo CHAR",
            ],
        );
        assert!(
            !stdout(&out).contains("CHAR"),
            "a device node from an image layer exists on the job's disk"
        );
    }

    // A privileged container that mounts the cgroup hierarchy cannot raise the
    // job's own limit: the limit lives above the job's cgroup namespace.
    let cg = sb.record().cgroup.clone().unwrap();
    assert_eq!(cg.memory_limit(), Some(600 << 20));
    // In its own cgroup namespace, and in the job's (`--cgroupns host`).
    for cgroupns in ["private", "host"] {
        let _ = docker(
            &s,
            &[
                "run",
                "--rm",
                "--privileged",
                "--cgroupns",
                cgroupns,
                "busybox:test",
                "sh",
                "-c",
                // Both layouts: v1's memory hierarchy, v2's single tree.
                "mkdir -p /cg /cg2; mount -t cgroup -o memory cgroup /cg; mount -t cgroup2 none /cg2; \
         for f in /cg/memory.limit_in_bytes /cg/../memory.limit_in_bytes \
                  /sys/fs/cgroup/memory/memory.limit_in_bytes; do echo 8589934592 > $f; done; \
         for f in /cg2/memory.max /cg2/../memory.max /sys/fs/cgroup/memory.max; do echo max > $f; done",
            ],
        );
    }
    assert_eq!(
        cg.memory_limit(),
        Some(600 << 20),
        "the job raised its own memory limit"
    );
    // And the limit still holds for the whole job: 800 MB in one container is killed.
    let hog = docker(
        &s,
        &[
            "run",
            "--rm",
            "busybox:test",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=800M",
            "count=1",
        ],
    );
    assert_eq!(hog.status.code(), Some(137), "{}", stderr(&hog));
    // The job's dockerd survived its container's OOM kill.
    docker_ok(&s, &["version"]);

    rt.block_on(e.teardown(sb.id())).unwrap();
}

/// (major, minor) of the block device holding the host's root filesystem.
fn root_device() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/").unwrap().dev();
    (nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
}

#[test]
fn two_jobs_see_nothing_of_each_other() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(3, "twojobs");
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    assert_ne!(a.record().host_id, b.record().host_id);
    let (sa, sbk) = (a.socket(), b.socket());
    import_busybox(&sa);
    import_busybox(&sbk);
    docker_ok(&sa, &["tag", "busybox:test", "only-in-a:1"]);
    docker_ok(
        &sa,
        &[
            "run",
            "-d",
            "--name",
            "a-secret",
            "-p",
            "8080:8080",
            "busybox:test",
            "sh",
            "-c",
            "while true; do echo from-a | nc -l -p 8080; done",
        ],
    );
    docker_ok(
        &sa,
        &[
            "run",
            "-d",
            "--name",
            "a-sleeper",
            "busybox:test",
            "sleep",
            "4242",
        ],
    );

    // Containers, images.
    assert!(!docker_ok(&sbk, &["ps", "-a"]).contains("a-secret"));
    assert!(!docker_ok(&sbk, &["images"]).contains("only-in-a"));
    // Processes: B's view of its own pid namespace has none of A's.
    let ps = docker_ok(
        &sbk,
        &[
            "run",
            "--rm",
            "--pid",
            "host",
            "busybox:test",
            "ps",
            "-o",
            "args",
        ],
    );
    // (The whole command line: a random job id may contain "4242".)
    assert!(!ps.contains("sleep 4242"), "B sees A's processes: {ps}");
    // Files: A's state dir is closed to B's root, even through a bind mount.
    let a_dir = e.config().state_dir.join("jobs").join(a.id()).join("root");
    let out = docker(
        &sbk,
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            &format!("{}:/a", a_dir.display()),
            "busybox:test",
            "ls",
            "/a/data",
        ],
    );
    assert!(
        !out.status.success(),
        "B listed A's data-root: {}",
        stdout(&out)
    );

    // Network: A's published port answers at A's address (from the host)...
    let a_ip = a.record().job_ip;
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if let Ok(mut c) =
            std::net::TcpStream::connect_timeout(&(a_ip, 8080).into(), Duration::from_secs(1))
        {
            use std::io::Read;
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = c.read_to_string(&mut seen);
            if seen.contains("from-a") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.contains("from-a"),
        "A's published port did not answer: {seen:?}"
    );
    // ...but never to B.
    let out = docker(
        &sbk,
        &[
            "run",
            "--rm",
            "busybox:test",
            "nc",
            "-w",
            "2",
            &a_ip.to_string(),
            "8080",
        ],
    );
    assert!(!stdout(&out).contains("from-a"), "B reached A's port");

    rt.block_on(e.teardown(a.id())).unwrap();
    rt.block_on(e.teardown(b.id())).unwrap();
}

#[test]
fn containers_reach_the_outside_with_dns_and_the_right_mtu_but_not_the_host() {
    if !prerequisites() {
        return;
    }
    let outside = Outside::create(7);
    outside.serve_reply(9000, "pong-from-outside\n");
    // A resolver on the host's loopback: the job must reach it through its relay.
    let dns = spawn_dns(outside.addr);
    // Host services the job must never reach: one on loopback, one on all addresses.
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let (lo_port, any_port) = (
        lo.local_addr().unwrap().port(),
        any.local_addr().unwrap().port(),
    );

    let rt = rt();
    let mut cfg = engine_config(4, "egress");
    cfg.dns_upstreams = vec![dns];
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);

    let target = outside.addr.to_string();
    let mut got = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        got = stdout(&docker(
            &s,
            &[
                "run",
                "--rm",
                "busybox:test",
                "nc",
                "-w",
                "3",
                &target,
                "9000",
            ],
        ));
        if got.contains("pong") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        got.contains("pong-from-outside"),
        "egress by address: {got:?}"
    );
    // By name, on the default bridge and through the embedded DNS of a
    // user-defined network; the host's resolver listens on loopback.
    let by_name = docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "busybox:test",
            "nc",
            "-w",
            "3",
            "egress.berth.test",
            "9000",
        ],
    );
    assert!(by_name.contains("pong"), "egress by name: {by_name:?}");
    docker_ok(&s, &["network", "create", "udn"]);
    let by_name = docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "--net",
            "udn",
            "busybox:test",
            "nc",
            "-w",
            "3",
            "egress.berth.test",
            "9000",
        ],
    );
    assert!(
        by_name.contains("pong"),
        "egress by name on a user network: {by_name:?}"
    );

    // The link and the containers' interfaces carry the host's MTU.
    let mtu = docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "busybox:test",
            "cat",
            "/sys/class/net/eth0/mtu",
        ],
    );
    assert_eq!(mtu.trim(), e.mtu().to_string());
    // A large transfer completes intact (an MTU mismatch hangs here).
    let sink = outside.serve_count(9002);
    docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "busybox:test",
            "sh",
            "-c",
            &format!("head -c 3000000 /dev/zero | nc {target} 9002"),
        ],
    );
    assert_eq!(sink.join().unwrap(), 3_000_000);

    // The host end of the link speaks no IPv6 (the rules are IPv4 only).
    let host_if = format!("bh{}", sb.id());
    let v6 = Command::new("ip")
        .args(["-6", "addr", "show", "dev", &host_if])
        .output()
        .unwrap();
    assert!(v6.status.success());
    assert!(
        stdout(&v6).trim().is_empty(),
        "IPv6 on the host end: {}",
        stdout(&v6)
    );

    // Host services: neither the loopback one nor the all-addresses one.
    let host_ip = sb.record().host_ip.to_string();
    for (addr, port) in [
        ("127.0.0.1", lo_port),
        (host_ip.as_str(), any_port),
        (host_ip.as_str(), lo_port),
    ] {
        let out = docker(
            &s,
            &[
                "run",
                "--rm",
                "busybox:test",
                "sh",
                "-c",
                &format!("echo x | nc -w 2 {addr} {port} && echo CONNECTED"),
            ],
        );
        assert!(
            !stdout(&out).contains("CONNECTED"),
            "reached host service {addr}:{port}"
        );
    }

    rt.block_on(e.teardown(sb.id())).unwrap();
    drop((lo, any));
}

#[test]
fn a_memory_hog_is_killed_while_the_host_and_other_jobs_are_unharmed() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(5, "limits");
    let small = Limits {
        memory_bytes: Some(300 << 20),
        pids: Some(500),
        cpus: Some(1.0),
        disk_bytes: None,
    };
    let a = rt.block_on(e.start(Some(small))).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    import_busybox(&a.socket());
    import_busybox(&b.socket());
    let hog = docker(&a.socket(), RUN_HOG_500M);
    assert_eq!(hog.status.code(), Some(137), "{}", stderr(&hog));
    // The job's own daemon, the other job and the host carry on.
    assert_eq!(a.status(), Status::Running);
    docker_ok(&a.socket(), &["version"]);
    assert_eq!(
        docker_ok(
            &b.socket(),
            &["run", "--rm", "busybox:test", "echo", "fine"]
        )
        .trim(),
        "fine"
    );
    // The same allocation is fine in the job without the small limit.
    let ok = docker(&b.socket(), RUN_HOG_500M);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // A fork bomb stops at the job's pids limit.
    let _ = docker(
        &a.socket(),
        &[
            "run",
            "--rm",
            "busybox:test",
            "sh",
            "-c",
            "for i in $(seq 1 800); do sleep 30 & done; wait",
        ],
    );
    let cg = a.record().cgroup.clone().unwrap();
    assert_eq!(cg.pids_limit(), Some(500));
    docker_ok(&b.socket(), &["version"]);
    // A container's own CPU time (its /proc stat, in clock ticks) is part
    // of what its job used.
    let stat = docker_ok(
        &b.socket(),
        &[
            "run",
            "--rm",
            "busybox:test",
            "sh",
            "-c",
            "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; cat /proc/$$/stat",
        ],
    );
    // After the command's name: the state (field 3), then utime and stime
    // (fields 14 and 15), in USER_HZ ticks (100 a second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    assert!(ticks > 0, "{stat}");
    let used_a = rt.block_on(e.teardown(a.id())).unwrap().usage.unwrap();
    let used_b = rt.block_on(e.teardown(b.id())).unwrap().usage.unwrap();
    assert!(
        used_b.cpu >= Duration::from_millis(ticks * 10),
        "{used_b:?} against the container's {ticks} ticks"
    );
    assert!(used_a.cpu > Duration::ZERO, "{used_a:?}");
    // The 500 MB buffer counts in b. a's hog took it to its limit and no
    // further (the kernel may force a few pages past it while it kills).
    assert!(used_b.memory_peak.unwrap() >= 500_000_000, "{used_b:?}");
    let peak_a = used_a.memory_peak.unwrap();
    assert!((250 << 20..=301 << 20).contains(&peak_a), "{used_a:?}");
}

/// `tests/clients/kernel_hold.c`, built static for a busybox image; where
/// the tests run without a compiler (the cgroup v2 guests), the one their
/// host built, named by BERTH_TEST_KERNEL_HOLD. `test` names this build,
/// one per test (two tests writing one file would race).
fn kernel_hold(test: &str) -> std::path::PathBuf {
    if let Some(built) = std::env::var_os("BERTH_TEST_KERNEL_HOLD") {
        let built = std::path::PathBuf::from(built);
        assert!(
            built.is_file(),
            "BERTH_TEST_KERNEL_HOLD={} is no file",
            built.display()
        );
        return built;
    }
    let out = std::path::PathBuf::from(format!("/var/lib/bt/kernel_hold-{test}"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/kernel_hold.c");
    let o = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("gcc is missing: apt-get install gcc libc6-dev");
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    out
}

/// Starts `kernel_hold WHAT` in a container of the job at `sock` (with
/// `create`'s further options `opts`); returns how many it got and why it
/// got no more.
fn hold(sock: &Path, prog: &Path, what: &str, opts: &[&str]) -> (usize, String) {
    import_busybox(sock);
    docker_ok(
        sock,
        &[
            &["create", "--name", "hold"][..],
            opts,
            &["busybox:test", "/kernel_hold", what],
        ]
        .concat(),
    );
    docker_ok(sock, &["cp", prog.to_str().unwrap(), "hold:/kernel_hold"]);
    docker_ok(sock, &["start", "hold"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let said = docker_ok(sock, &["logs", "hold"]);
        if let Some((n, why)) = said.trim().split_once(' ') {
            return (n.parse().unwrap(), why.to_string());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kernel_hold {what} said nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_job_that_takes_every_inotify_instance_takes_its_own_alone() {
    if !prerequisites() {
        return;
    }
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let prog = kernel_hold("inotify");
    let rt = rt();
    let e = engine(97, "inotify");
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    // Job a takes every instance it can, and holds them.
    let (got_a, why) = hold(&a.socket(), &prog, "inotify", &[]);
    assert_eq!(
        why, "Too many open files",
        "job a stopped at {got_a}: {why}"
    );
    assert!(got_a > 0, "job a got no inotify instance at all");
    // The host's root (its services, the agent) and job b have their own.
    // SAFETY: inotify_init1 takes flags only; the fd it returns is closed.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    assert!(
        fd >= 0,
        "with job a holding {got_a} inotify instances, root on the host has none: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is this test's own, open and unused.
    unsafe { libc::close(fd) };
    let (got_b, why) = hold(&b.socket(), &prog, "inotify", &[]);
    assert_eq!(
        why, "Too many open files",
        "job b stopped at {got_b}: {why}"
    );
    assert!(
        got_a + got_b > max,
        "jobs a and b got {got_a} + {got_b} inotify instances: one bound of {max} for both"
    );
    docker_ok(&a.socket(), &["version"]);
    rt.block_on(e.teardown(a.id())).unwrap();
    rt.block_on(e.teardown(b.id())).unwrap();
}

/// Every running container holds a session keyring, charged to its user:
/// a job whose container takes every key its ids may hold starts no
/// further container, and the other jobs start theirs.
#[test]
fn a_job_that_takes_every_key_stops_only_its_own_containers() {
    if !prerequisites() {
        return;
    }
    let prog = kernel_hold("keys");
    let rt = rt();
    let e = engine(99, "keys");
    let a = rt.block_on(e.start(None)).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    // Docker's default seccomp profile refuses add_key(2); a job may lift
    // it (as --privileged does), and must still take only its own keys.
    let (got, why) = hold(
        &a.socket(),
        &prog,
        "keys",
        &["--security-opt", "seccomp=unconfined"],
    );
    assert_eq!(why, "Disk quota exceeded", "job a stopped at {got}: {why}");
    assert!(got > 0, "job a got no key at all");
    let o = docker(&a.socket(), &["run", "--rm", "busybox:test", "true"]);
    assert!(
        !o.status.success(),
        "job a started a container with every key of its ids taken"
    );
    assert!(
        stderr(&o).contains("quota"),
        "job a's refusal does not say why: {}",
        stderr(&o)
    );
    import_busybox(&b.socket());
    docker_ok(&b.socket(), &["run", "--rm", "busybox:test", "true"]);
    // Its keys go with the container that held them.
    docker_ok(&a.socket(), &["rm", "-f", "hold"]);
    docker_ok(&a.socket(), &["run", "--rm", "busybox:test", "true"]);
    rt.block_on(e.teardown(a.id())).unwrap();
    rt.block_on(e.teardown(b.id())).unwrap();
}

#[test]
fn teardown_leaves_nothing_behind() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(6, "teardown");
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);
    docker_ok(&s, &["network", "create", "n1"]);
    docker_ok(&s, &["volume", "create", "v1"]);
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--net",
            "n1",
            "-v",
            "v1:/data",
            "busybox:test",
            "sleep",
            "600",
        ],
    );
    docker_ok(&s, &["run", "-d", "busybox:test", "sleep", "600"]);
    // The link as the agent made it: the host end up with the first address
    // of the job's /30 and the host's MTU; the job's end is eth0 in the
    // job's namespace, with the second address, the same MTU and the
    // default route through the host end.
    let rec = sb.record();
    let host_if = berth::sandbox::net::host_ifname(sb.id());
    let init = rec.init_pid.expect("the job's init").to_string();
    let ip = |netns: Option<&str>, args: &[&str]| {
        let mut c = match netns {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", pid, "-n", "ip"]);
                c
            }
            None => Command::new("ip"),
        };
        let out = c.args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let mtu = format!(" mtu {} ", e.mtu());
    let host_end = ip(None, &["-o", "link", "show", "dev", &host_if]);
    assert!(
        host_end.contains(&mtu) && host_end.contains(",UP"),
        "{host_end}"
    );
    let addr = ip(None, &["-o", "-4", "addr", "show", "dev", &host_if]);
    assert!(
        addr.contains(&format!("inet {}/30 ", rec.host_ip)),
        "{addr}"
    );
    let eth0 = ip(Some(&init), &["-o", "link", "show", "dev", "eth0"]);
    assert!(eth0.contains(&mtu) && eth0.contains(",UP"), "{eth0}");
    let addr = ip(Some(&init), &["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("inet {}/30 ", rec.job_ip)), "{addr}");
    let route = ip(Some(&init), &["-4", "route", "show", "default"]);
    assert!(
        route.contains(&format!("default via {} dev eth0", rec.host_ip)),
        "{route}"
    );
    let traces = Traces::capture(&e, &sb);
    assert!(
        traces.pids.len() >= 5,
        "dockerd, containerd, shims, containers: {:?}",
        traces.pids
    );
    // No process of the job holds a descriptor of the agent's: the start
    // channel (a SOCK_SEQPACKET pair made in the host's network namespace)
    // is closed everywhere once dockerd runs.
    let seqpackets: Vec<String> = std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(4) == Some(&"0005")).then(|| format!("socket:[{}]", w[6]))
        })
        .collect();
    for pid in &traces.pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            assert!(
                !seqpackets.iter().any(|s| *s == target),
                "job process {pid} holds the agent's channel as fd {:?}",
                fd.file_name()
            );
        }
    }
    let t = rt.block_on(e.teardown(sb.id())).unwrap();
    assert!(t.killed, "a running job is killed, not asked to stop");
    traces.assert_gone();
    // The pair went with the job's namespace: deleting it again is no error.
    berth::sandbox::net::delete_link(sb.id()).expect("deleting a link that is gone");
    assert_eq!(sb.status(), Status::Stopped);
    // A second teardown finds nothing to do and says so.
    assert!(matches!(
        rt.block_on(e.teardown(sb.id())),
        Err(SandboxError::NoSuchJob(_))
    ));
}

#[test]
fn a_killed_dockerd_is_noticed_and_the_job_reported_failed() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(8, "killed");
    let sb = rt.block_on(e.start(None)).unwrap();
    let dockerd = sb
        .pids()
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "dockerd")
                .unwrap_or(false)
        })
        .expect("dockerd in the job");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dockerd as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), sb.ended()).await })
        .expect("the failure is noticed");
    match status {
        Status::Failed(why) => assert!(why.contains("SIGKILL"), "{why}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    let traces = Traces {
        id: sb.id().into(),
        pids: vec![dockerd],
        net_ns: None,
        job_dir: e.config().state_dir.join("jobs").join(sb.id()),
        state_dir: e.config().state_dir.clone(),
        slot: sb.record().slot,
        cgroups: sb.record().cgroup.unwrap().limit_dirs(),
    };
    rt.block_on(e.teardown(sb.id())).unwrap();
    traces.assert_gone();
}

#[test]
fn a_sandbox_left_by_a_killed_agent_is_cleaned_on_restart() {
    if !prerequisites() {
        return;
    }
    let cfg = engine_config(9, "recovery");
    let conf_path = write_config(9, "recovery", "");
    let mut agent = Command::new(berth_bin())
        .args(["sandbox", "up", "--config", conf_path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(agent.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let id = first.split_whitespace().nth(1).expect("job id").to_string();
    let export = lines.next().unwrap().unwrap();
    assert!(export.starts_with("export DOCKER_HOST=unix://"), "{export}");
    let sock = export
        .trim_start_matches("export DOCKER_HOST=unix://")
        .to_string();
    docker_ok(Path::new(&sock), &["version"]);
    // With a paused container: on cgroup v1 its frozen tasks ignore SIGKILL
    // until thawed.
    import_busybox(Path::new(&sock));
    let c = docker_ok(
        Path::new(&sock),
        &["run", "-d", "busybox:test", "sleep", "600"],
    );
    docker_ok(Path::new(&sock), &["pause", c.trim()]);
    // The agent dies without a chance to clean up.
    agent.kill().unwrap();
    agent.wait().unwrap();
    let rec = berth::sandbox::JobRecord::load(&cfg.state_dir, &id).unwrap();
    let cg = rec.cgroup.clone().unwrap();
    let pids = cg.pids();
    assert!(!pids.is_empty(), "the job outlived its agent");
    docker_ok(Path::new(&sock), &["version"]);

    let rt = rt();
    let e = berth::sandbox::Engine::new(cfg.clone()).unwrap();
    let recovered: Vec<String> = rt
        .block_on(e.recover())
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(recovered, vec![id.clone()]);
    Traces {
        id,
        pids,
        net_ns: None,
        job_dir: cfg.state_dir.join("jobs").join(&rec.id),
        state_dir: cfg.state_dir.clone(),
        slot: rec.slot,
        cgroups: cg.limit_dirs(),
    }
    .assert_gone();
}

#[test]
fn missing_prerequisites_and_exhausted_pools_name_the_fix() {
    if !prerequisites() {
        return;
    }
    let mut cfg = engine_config(10, "prereq");
    cfg.dockerd = "/nonexistent/dockerd".into();
    let err = berth::sandbox::Engine::new(cfg)
        .err()
        .expect("no dockerd is an error")
        .to_string();
    assert!(err.contains("apt-get install docker.io"), "{err}");

    let mut cfg = engine_config(10, "prereq");
    cfg.uid_ranges = 1;
    let rt = rt();
    let e = berth::sandbox::Engine::new(cfg.clone()).unwrap();
    // A second engine on the same state dir would tear down the first's jobs.
    let err = berth::sandbox::Engine::new(cfg)
        .err()
        .expect("state dir is locked")
        .to_string();
    assert!(err.contains("another berth agent"), "{err}");
    let a = rt.block_on(e.start(None)).unwrap();
    let err = rt
        .block_on(e.start(None))
        .err()
        .expect("pool of one")
        .to_string();
    assert!(
        err.contains("no free job slot") && err.contains("uid_ranges"),
        "{err}"
    );
    // The first job keeps serving.
    docker_ok(&a.socket(), &["version"]);
    rt.block_on(e.teardown(a.id())).unwrap();
    drop(e);

    // Something that is no dockerd is refused before any job, by name.
    let mut cfg = engine_config(10, "prereq");
    cfg.dockerd = "/bin/false".into();
    let err = berth::sandbox::Engine::new(cfg.clone())
        .err()
        .expect("/bin/false is no engine")
        .to_string();
    assert!(
        err.contains("dockerd") && err.contains("/bin/false") && err.contains("no version"),
        "{err}"
    );
    // A dockerd older than 20.10 is refused, saying why.
    let old = cfg.state_dir.with_extension("old-dockerd");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'Docker version 19.03.15, build 99e3ed8'\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    cfg.dockerd = old;
    let err = berth::sandbox::Engine::new(cfg.clone())
        .err()
        .expect("19.03 is refused")
        .to_string();
    assert!(
        err.contains("19.03.15") && err.contains("20.10.0 or later"),
        "{err}"
    );
    // A dockerd that dies at start: a clear error, and nothing left behind.
    let dies = cfg.state_dir.with_extension("dying-dockerd");
    fake_dockerd(&dies, "fake dockerd: dies at start");
    cfg.dockerd = dies;
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let err = rt
        .block_on(e.start(None))
        .err()
        .expect("dockerd exits")
        .to_string();
    assert!(
        err.contains("dockerd exited") && err.contains("/failed/") && err.contains(".log"),
        "{err}"
    );
    let id = err
        .split_whitespace()
        .nth(1)
        .expect("job id in the error")
        .to_string();
    assert!(e.list().is_empty());
    let jobs = std::fs::read_dir(e.config().state_dir.join("jobs"))
        .unwrap()
        .count();
    assert_eq!(jobs, 0, "a failed start left a job directory");
    let slots = std::fs::read_dir(e.config().state_dir.join("slots"))
        .unwrap()
        .count();
    assert_eq!(slots, 0, "a failed start kept its slot");
    for table in ["filter", "nat"] {
        let rules = Command::new("iptables")
            .args(["-w", "-t", table, "-S"])
            .output()
            .unwrap();
        assert!(!stdout(&rules).contains(&id), "a failed start left rules");
    }
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !stdout(&links).contains(&id),
        "a failed start left its link"
    );
}

#[test]
fn without_delegable_cgroups_jobs_fall_back_to_rootless_dockerd() {
    if !prerequisites() {
        return;
    }
    // A cgroup root with no hierarchy mounted: nothing can be delegated.
    let mut cfg = engine_config(11, "rootless");
    cfg.cgroup_root = "/var/lib/bt/no-cgroups-here".into();
    std::fs::create_dir_all(&cfg.cgroup_root).unwrap();
    let rt = rt();
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    assert!(!e.delegates_cgroups());
    let sb = rt.block_on(e.start(None)).unwrap();
    assert!(sb.record().cgroup.is_none());
    let s = sb.socket();
    let info = docker_ok(&s, &["info", "--format", "{{.CgroupDriver}}"]);
    assert_eq!(info.trim(), "none", "rootless dockerd has no cgroup driver");
    import_busybox(&s);
    assert_eq!(
        docker_ok(&s, &["run", "--rm", "busybox:test", "echo", "hi"]).trim(),
        "hi"
    );
    let traces = Traces::capture(&e, &sb);
    rt.block_on(e.teardown(sb.id())).unwrap();
    traces.assert_gone();
}

#[test]
fn a_failed_start_keeps_its_log_and_quotes_its_last_lines() {
    if !prerequisites() {
        return;
    }
    // A "dockerd" that explains itself and exits, as a broken install would.
    let mut cfg = engine_config(12, "failed-start");
    let fake = cfg.state_dir.with_extension("fake-dockerd");
    fake_dockerd(
        &fake,
        "level=fatal msg=\"fake dockerd: cannot start: bad storage driver\"",
    );
    cfg.dockerd = fake.clone();
    let state = cfg.state_dir.clone();
    let rt = rt();
    let e = berth::sandbox::Engine::new(cfg).unwrap();
    let err = rt.block_on(e.start(None)).err().expect("the start fails");
    let text = err.to_string();
    assert!(text.contains("dockerd exited during start"), "{text}");
    assert!(
        text.contains("fake dockerd: cannot start: bad storage driver"),
        "the error quotes the log: {text}"
    );
    let SandboxError::StartFailed { id, kept, .. } = &err else {
        panic!("expected StartFailed, got {err:?}");
    };
    let kept = kept.as_ref().expect("the log is kept");
    assert_eq!(kept.path, state.join("failed").join(format!("{id}.log")));
    assert!(text.contains(&kept.path.display().to_string()), "{text}");
    let log = std::fs::read_to_string(&kept.path).unwrap();
    assert!(log.contains("bad storage driver"), "{log}");
    // The job itself is gone: the kept log is all that remains of it.
    assert!(!state.join("jobs").join(id).exists());
    let _ = std::fs::remove_file(&fake);
}

#[test]
fn a_job_that_paused_forked_and_killed_its_own_dockerd_is_still_torn_down() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = berth::sandbox::Engine::new(berth::sandbox::SandboxConfig {
        health_interval: Duration::from_millis(500),
        ..engine_config(57, "stubborn")
    })
    .unwrap();
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);
    let run = |args: &[&str]| docker_ok(&s, &[&["run", "-d", "busybox:test"], args].concat());
    // Running, paused (a frozen cgroup: on v1 its tasks ignore SIGKILL
    // until thawed), a zombie, and a fork bomb (held by its container's
    // pids limit, so the job can still start the container that kills its
    // dockerd).
    run(&["sleep", "600"]);
    let paused = run(&["sleep", "600"]);
    docker_ok(&s, &["pause", paused.trim()]);
    run(&["sh", "-c", "sleep 0.1 & exec sleep 600"]);
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--pids-limit",
            "300",
            "busybox:test",
            "sh",
            "-c",
            "b() { b | b & }; b; sleep 600",
        ],
    );
    let traces = Traces::capture(&e, &sb);
    // The job kills its own dockerd from a privileged container in its pid
    // namespace; the client loses its daemon on the way.
    let _ = docker(
        &s,
        &[
            "run",
            "--rm",
            "--privileged",
            "--pid=host",
            "busybox:test",
            "sh",
            "-c",
            "kill -9 $(pidof dockerd)",
        ],
    );
    // Its books say so: the dockerd is gone, whatever its init is doing.
    let status = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), sb.ended()).await })
        .expect("the job's end is noticed");
    assert!(
        matches!(&status, Status::Failed(_)),
        "expected Failed, got {status:?}"
    );
    let t = rt.block_on(e.teardown(sb.id())).unwrap();
    assert_eq!(t.id, sb.id());
    traces.assert_gone();
    assert!(e.stuck().is_empty(), "{:?}", e.stuck());
}

#[test]
fn a_job_that_fills_its_disk_gets_enospc_alone() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(58, "disk");
    let small = Limits {
        disk_bytes: Some(128 << 20),
        ..Default::default()
    };
    let a = rt.block_on(e.start(Some(small))).unwrap();
    let b = rt.block_on(e.start(None)).unwrap();
    import_busybox(&a.socket());
    import_busybox(&b.socket());
    let job_dir = |sb: &berth::sandbox::Sandbox| e.config().state_dir.join("jobs").join(sb.id());
    // overlay2 works on the job's own filesystem; container logs are capped.
    assert_eq!(
        docker_ok(&a.socket(), &["info", "--format", "{{.Driver}}"]).trim(),
        "overlay2"
    );
    let c = docker_ok(&a.socket(), &["create", "busybox:test", "true"]);
    let log_config = docker_ok(
        &a.socket(),
        &[
            "inspect",
            "--format",
            "{{json .HostConfig.LogConfig}}",
            c.trim(),
        ],
    );
    assert!(
        log_config.contains(r#""max-size":"10m""#) && log_config.contains(r#""max-file":"3""#),
        "{log_config}"
    );
    // The job's private tmpfs mounts are sized.
    let init = a.record().init_pid.unwrap();
    let mounts = std::fs::read_to_string(format!("/proc/{init}/mountinfo")).unwrap();
    for (at, size) in [
        ("/tmp", "size=524288k"),
        ("/dev/shm", "size=65536k"),
        ("/run", "size=65536k"),
    ] {
        let line = mounts
            .lines()
            // The job's own, mounted over the host's: the last one.
            .rfind(|l| l.split_whitespace().nth(4) == Some(at) && l.contains(" - tmpfs "))
            .unwrap_or_else(|| panic!("no tmpfs at {at}:\n{mounts}"));
        assert!(line.contains(size), "{at}: {line}");
    }
    // 200 MB into a 128 MiB disk: the job's write fails with ENOSPC.
    let fill = docker(&a.socket(), &[&["run", "--rm"], WRITE_200MB].concat());
    assert!(!fill.status.success(), "200 MB fit in a 128 MiB disk");
    assert!(
        stderr(&fill).contains("No space left on device")
            || stdout(&fill).contains("No space left on device"),
        "{}{}",
        stdout(&fill),
        stderr(&fill)
    );
    // The host gave the job no more than its bound.
    let used = berth::sandbox::fs::disk::used_on_host(&job_dir(&a)).unwrap();
    assert!(used <= 130 << 20, "the job's image takes {used} bytes");
    // The other job, on the same host filesystem, writes as usual, and the
    // full one still answers.
    docker_ok(&b.socket(), &[&["run", "--rm"], WRITE_200MB].concat());
    docker_ok(&a.socket(), &["version"]);
    // Teardown frees the space at once: image and mount are gone.
    let traces = Traces::capture(&e, &a);
    rt.block_on(e.teardown(a.id())).unwrap();
    traces.assert_gone();
    assert!(!job_dir(&a).join(berth::sandbox::fs::disk::IMAGE).exists());
    rt.block_on(e.teardown(b.id())).unwrap();
}
