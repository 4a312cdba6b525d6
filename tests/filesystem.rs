//! What a job sees of the host's filesystem: its private root, and the
//! workspaces bound into it, tried from inside the job with the real
//! dockerd and docker CLI (containers `--privileged` too), and the exact
//! docker calls of the CI systems that use workspaces (Jenkins'
//! docker-workflow `inside`, GitHub Actions' `container:` jobs). Runs as
//! root; fails loudly when a prerequisite is missing.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth::sandbox::{Engine, SandboxConfig, WorkspaceRequest};
use common::*;

/// A workspace owner that is no job's and not root.
const OWNER: (u32, u32) = (4242, 4343);

fn lines(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A fresh directory below which this test's workspaces live (its allowed
/// root), made as a CI agent's workspace directory would be.
fn ws_base(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/var/lib/bt-ws/{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `path` as a directory of `owner`, mode `mode`.
fn owned_dir(path: &Path, owner: (u32, u32), mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(owner.0), Some(owner.1)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn owned_file(path: &Path, text: &str, owner: (u32, u32), mode: u32) {
    std::fs::write(path, text).unwrap();
    std::os::unix::fs::chown(path, Some(owner.0), Some(owner.1)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn engine_with_workspaces(n: u32, name: &str, allowed: &[&Path]) -> Engine {
    let cfg = SandboxConfig {
        workspaces: berth::sandbox::fs::workspaces::WorkspacesConfig {
            allowed_roots: allowed.iter().map(|p| p.to_path_buf()).collect(),
        },
        ..engine_config(n, name)
    };
    Engine::new(cfg).expect("engine")
}

fn ws(path: &Path, as_uid: Option<u32>) -> WorkspaceRequest {
    WorkspaceRequest {
        path: path.to_path_buf(),
        as_uid,
    }
}

/// Every file below `dir` whose owner or group is one of `ids`.
fn owned_by(dir: &Path, ids: std::ops::Range<u32>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let md = std::fs::symlink_metadata(&d).unwrap();
        if ids.contains(&md.uid()) || ids.contains(&md.gid()) {
            found.push(d.clone());
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                todo.push(e.path());
            }
        }
    }
    found
}

/// The top of a job's root, as `docker run -v /:/host` shows it: the host's
/// system directories that exist here, and the job's own.
fn expected_top() -> BTreeSet<String> {
    let mut want = set(&["dev", "etc", "opt", "proc", "run", "sys", "tmp", "var"]);
    for d in ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if std::fs::symlink_metadata(Path::new("/").join(d)).is_ok() {
            want.insert(d.into());
        }
    }
    want
}

#[test]
fn a_job_sees_its_own_root_and_nothing_else_of_the_host() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(40, "fs-root");
    let sb = rt.block_on(e.start(None)).unwrap();
    let s = sb.socket();
    import_busybox(&s);
    let state = e.config().state_dir.clone();
    let host_marker = Path::new("/srv").join(format!("berth-fs-marker-{}", sb.id()));
    std::fs::create_dir_all("/srv").unwrap();
    std::fs::write(&host_marker, "host").unwrap();

    let look = |privileged: bool, cmd: &str| {
        let mut args = vec!["run", "--rm"];
        if privileged {
            args.push("--privileged");
        }
        args.extend(["-v", "/:/host", "busybox:test", "sh", "-c", cmd]);
        docker_ok(&s, &args)
    };
    for privileged in [false, true] {
        let top = lines(&look(privileged, "ls -A /host"));
        assert_eq!(top, expected_top(), "privileged: {privileged}");
        assert_eq!(
            lines(&look(privileged, "ls -A /host/var")),
            set(&["lib", "run", "tmp"])
        );
        assert_eq!(
            lines(&look(privileged, "ls -A /host/var/lib")),
            set(&["berth", "docker"]),
            "the job's own disk and data-root, nothing of the host's /var/lib"
        );
        let probes = [
            "/home",
            "/root",
            "/srv",
            "/opt/berth",
            "/mnt",
            "/media",
            "/boot",
            "/etc/shadow",
            "/etc/ssh",
            "/var/lib/bt",
            "/var/log",
        ];
        for p in probes.iter().copied().chain([state.to_str().unwrap()]) {
            let out = look(
                privileged,
                &format!("test -e /host{p} && echo THERE || echo absent"),
            );
            assert_eq!(out.trim(), "absent", "{p} is visible in the job");
        }
        // The job's /opt holds what containerd makes there, nothing more.
        let opt = look(privileged, "find /host/opt ! -type d; ls -A /host/opt");
        assert_eq!(opt.trim(), "containerd", "/opt: {opt}");
        // The job's /etc is berth's: its users, its name, its resolver.
        let passwd = look(privileged, "cut -d: -f1 /host/etc/passwd");
        assert_eq!(lines(&passwd), set(&["root", "nobody"]));
        let hostname = look(privileged, "cat /host/etc/hostname");
        assert_eq!(hostname.trim(), format!("berth-{}", sb.id()));
        let resolv = look(privileged, "cat /host/etc/resolv.conf");
        assert_eq!(resolv.trim(), format!("nameserver {}", sb.record().host_ip));
        // A minimal /dev: what dockerd hands to containers comes from here.
        let dev = lines(&look(privileged, "ls -A /host/dev"));
        assert_eq!(
            dev,
            set(&[
                "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                "stdout", "tty", "urandom", "zero"
            ])
        );
    }
    // A privileged container in the job's own mount namespace (dockerd's)
    // finds the same root, and no way back to the host's.
    let out = docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "--privileged",
            "--pid",
            "host",
            "busybox:test",
            "sh",
            "-c",
            "nsenter -t \"$(pidof dockerd)\" -m sh -c 'ls -A /; echo ---; \
             ls /proc/1/root/srv 2>&1; umount -l /usr 2>&1; ls -A /usr | head -3; \
             mount -t proc proc /mnt 2>&1 || true'",
        ],
    );
    let (root, rest) = out.split_once("---").unwrap();
    assert_eq!(lines(root), expected_top(), "{out}");
    assert!(!rest.contains("berth-fs-marker"), "{out}");
    std::fs::remove_file(&host_marker).unwrap();
    rt.block_on(e.teardown(sb.id())).unwrap();
}

#[test]
fn jenkins_inside_runs_in_the_workspace_and_its_files_stay_the_owners() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let base = ws_base("jenkins");
    let jobs = base.join("workspace");
    owned_dir(&jobs, OWNER, 0o755);
    let wsp = jobs.join("app_main");
    owned_dir(&wsp, OWNER, 0o755);
    owned_file(&wsp.join("Makefile"), "all:\n", OWNER, 0o644);
    owned_file(&wsp.join("secret.txt"), "owner only\n", OWNER, 0o600);
    let e = engine_with_workspaces(41, "fs-jenkins", &[&jobs]);
    let sb = rt.block_on(e.start_job(None, &[ws(&wsp, None)])).unwrap();
    let traces = Traces::capture(&e, &sb);
    let host_ids = sb.record().host_id..sb.record().host_id + 65536;
    let s = sb.socket();
    import_busybox(&s);

    // The durable-task script Jenkins writes on its own filesystem.
    let wsd = wsp.display().to_string();
    let tmp = PathBuf::from(format!("{wsd}@tmp"));
    let md = std::fs::metadata(&tmp).expect("DIR@tmp made for the workspace");
    assert_eq!((md.uid(), md.gid()), OWNER);
    let durable = tmp.join("durable-1a2b3c4d");
    owned_dir(&durable, OWNER, 0o755);
    owned_file(
        &durable.join("script.sh"),
        "set -e\nid -u; id -g\ncat secret.txt\necho built > out.txt\nmkdir -p build/sub\n\
         echo more >> secret.txt\nexit 3\n",
        OWNER,
        0o644,
    );
    let user = format!("{}:{}", OWNER.0, OWNER.1);
    let vol = format!("{wsd}:{wsd}:rw,z");
    let tmp_vol = format!("{wsd}@tmp:{wsd}@tmp:rw,z");
    // docker-workflow's own sequence: inspect, run -d cat, top, exec, stop, rm.
    docker_ok(&s, &["inspect", "-f", ".", "busybox:test"]);
    let cid = docker_ok(
        &s,
        &[
            "run",
            "-t",
            "-d",
            "-u",
            &user,
            "-w",
            &wsd,
            "-v",
            &vol,
            "-v",
            &tmp_vol,
            "-e",
            "********",
            "busybox:test",
            "cat",
        ],
    );
    let cid = cid.trim();
    let top = docker_ok(&s, &["top", cid, "-eo", "pid,comm"]);
    assert!(top.contains("cat"), "{top}");
    let d = durable.display();
    let step = format!(
        "cd \"{wsd}\" && sh '{d}/script.sh' > '{d}/jenkins-log.txt' 2>&1; \
         echo $? > '{d}/jenkins-result.txt'"
    );
    docker_ok(&s, &["exec", cid, "sh", "-c", &step]);
    // Jenkins reads the log and the result on its own filesystem.
    let log = std::fs::read_to_string(durable.join("jenkins-log.txt")).unwrap();
    assert_eq!(log, format!("{}\n{}\nowner only\n", OWNER.0, OWNER.1));
    let result = std::fs::read_to_string(durable.join("jenkins-result.txt")).unwrap();
    assert_eq!(result.trim(), "3");
    // Everything the step wrote is the owner's, on the host.
    for f in [
        wsp.join("out.txt"),
        wsp.join("build/sub"),
        durable.join("jenkins-log.txt"),
        durable.join("jenkins-result.txt"),
    ] {
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), OWNER, "{}", f.display());
    }
    assert_eq!(
        std::fs::read_to_string(wsp.join("secret.txt")).unwrap(),
        "owner only\nmore\n"
    );
    docker_ok(&s, &["stop", "--time=1", cid]);
    docker_ok(&s, &["rm", "-f", cid]);

    // One job id is the owner: writes as any other are refused, and no
    // file can be given away, not even by a privileged container.
    let other = docker(
        &s,
        &[
            "run",
            "--rm",
            "-u",
            "2000:2000",
            "-v",
            &vol,
            "busybox:test",
            "touch",
            &format!("{wsd}/by-2000"),
        ],
    );
    assert!(!other.status.success(), "uid 2000 wrote into the workspace");
    let attack = docker(
        &s,
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            &vol,
            "busybox:test",
            "sh",
            "-c",
            &format!(
                "cd {wsd}; touch by-root && echo ROOT-CREATED; chown 0:0 out.txt && echo CHOWNED; \
                 mknod dev c 1 3 && echo MKNOD; cp /bin/busybox suid && chmod 4755 suid && echo SUID; \
                 mount -o remount,bind,suid,dev {wsd} && echo REMOUNTED; umount {wsd} && echo UNMOUNTED; true"
            ),
        ],
    );
    let said = String::from_utf8_lossy(&attack.stdout);
    for word in ["ROOT-CREATED", "CHOWNED", "MKNOD", "REMOUNTED", "UNMOUNTED"] {
        assert!(!said.contains(word), "{word}: {said}");
    }
    assert!(!wsp.join("by-root").exists() && !wsp.join("by-2000").exists());
    let md = std::fs::metadata(wsp.join("out.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), OWNER);

    // After the job: what it wrote stays, the owner's; nothing of the job's
    // ids is anywhere in the workspace, and nothing else of it is left.
    rt.block_on(e.teardown(sb.id())).unwrap();
    traces.assert_gone();
    assert!(wsp.join("out.txt").exists());
    for d in [&wsp, &tmp] {
        let left = owned_by(d, host_ids.clone());
        assert!(left.is_empty(), "owned by the job's ids: {left:?}");
    }
    // Released: another job may have it now.
    let again = rt.block_on(e.start_job(None, &[ws(&wsp, None)])).unwrap();
    rt.block_on(e.teardown(again.id())).unwrap();
}

#[test]
fn a_github_container_job_writes_as_root_and_the_runner_owns_the_files() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let base = ws_base("github");
    let runner = base.join("runner");
    owned_dir(&runner, OWNER, 0o755);
    let work = runner.join("_work");
    let externals = runner.join("externals");
    for d in [
        work.clone(),
        work.join("repo/repo"),
        work.join("_temp/_github_home"),
        work.join("_temp/_github_workflow"),
        work.join("_actions"),
        work.join("_tool"),
        externals.clone(),
        externals.join("node20/bin"),
    ] {
        owned_dir(&d, OWNER, 0o755);
    }
    owned_file(
        &externals.join("node20/bin/node"),
        "#!/bin/sh\necho node\n",
        OWNER,
        0o755,
    );
    owned_file(
        &work.join("_temp/step-0001.sh"),
        "id -u\nls /__e/node20/bin\necho artifact > dist.txt\nmkdir -p .cache/x\n\
         touch /__e/planted 2>/dev/null && echo PLANTED\necho $GITHUB_ACTIONS\n",
        OWNER,
        0o644,
    );
    let e = engine_with_workspaces(42, "fs-github", &[&runner]);
    let sb = rt
        .block_on(e.start_job(None, &[ws(&work, Some(0)), ws(&externals, Some(0))]))
        .unwrap();
    let host_ids = sb.record().host_id..sb.record().host_id + 65536;
    let s = sb.socket();
    import_busybox(&s);
    let w = work.display().to_string();
    let ext = externals.display().to_string();
    // actions/runner's container job: network, create, start, ps, inspect,
    // exec of each step as root, rm, network rm.
    let net = "github_network_5f3c9e";
    docker_ok(&s, &["network", "create", "--label", "5f3c9e", net]);
    let vols = [
        "/var/run/docker.sock:/var/run/docker.sock".to_string(),
        format!("{w}:/__w"),
        format!("{ext}:/__e:ro"),
        format!("{w}/_temp:/__w/_temp"),
        format!("{w}/_actions:/__w/_actions"),
        format!("{w}/_tool:/__w/_tool"),
        format!("{w}/_temp/_github_home:/github/home"),
        format!("{w}/_temp/_github_workflow:/github/workflow"),
    ];
    let mut create = vec![
        "create",
        "--name",
        "c5f3c9e",
        "--label",
        "5f3c9e",
        "--workdir",
        "/__w/repo/repo",
        "--network",
        net,
        "--network-alias",
        "build",
        "-e",
        "HOME=/github/home",
        "-e",
        "GITHUB_ACTIONS=true",
        "-e",
        "CI=true",
    ];
    for v in &vols {
        create.extend(["-v", v.as_str()]);
    }
    create.extend(["--entrypoint", "tail", "busybox:test", "-f", "/dev/null"]);
    let cid = docker_ok(&s, &create);
    let cid = cid.trim();
    docker_ok(&s, &["start", cid]);
    let ps = docker_ok(
        &s,
        &[
            "ps",
            "--all",
            "--filter",
            &format!("id={cid}"),
            "--filter",
            "status=running",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Status}}",
        ],
    );
    assert!(ps.contains(cid), "{ps}");
    docker_ok(
        &s,
        &[
            "inspect",
            "--format",
            "{{range .Config.Env}}{{println .}}{{end}}",
            cid,
        ],
    );
    let out = docker_ok(
        &s,
        &[
            "exec",
            "-i",
            "--workdir",
            "/__w/repo/repo",
            "-e",
            "GITHUB_ACTIONS=true",
            cid,
            "sh",
            "-e",
            "/__w/_temp/step-0001.sh",
        ],
    );
    assert_eq!(out, "0\nnode\ntrue\n", "step output");
    docker_ok(&s, &["rm", "--force", cid]);
    docker_ok(&s, &["network", "rm", net]);
    for f in [
        work.join("repo/repo/dist.txt"),
        work.join("repo/repo/.cache/x"),
    ] {
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), OWNER, "{}", f.display());
    }
    assert!(!externals.join("planted").exists());
    rt.block_on(e.teardown(sb.id())).unwrap();
    for d in [&work, &externals] {
        let left = owned_by(d, host_ids.clone());
        assert!(left.is_empty(), "owned by the job's ids: {left:?}");
    }
}

#[test]
fn workspaces_outside_what_the_agent_allows_are_refused_with_the_reason() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let base = ws_base("refusals");
    let allowed = base.join("allowed");
    owned_dir(&allowed, OWNER, 0o755);
    let mine = allowed.join("mine");
    owned_dir(&mine, OWNER, 0o755);
    let rooted = allowed.join("root-owned");
    owned_dir(&rooted, (0, 0), 0o755);
    let outside = base.join("outside");
    owned_dir(&outside, OWNER, 0o755);
    std::os::unix::fs::symlink("/etc", allowed.join("to-etc")).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("to-outside")).unwrap();
    let e = engine_with_workspaces(18, "fs-refuse", &[&allowed]);
    let state = e.config().state_dir.clone();
    let live = rt.block_on(e.start_job(None, &[ws(&mine, None)])).unwrap();
    let in_use = format!("a workspace of live job {}", live.id());
    let cases: Vec<(PathBuf, &str)> = vec![
        ("/".into(), "it is the root directory"),
        ("/etc".into(), "system directory (/etc)"),
        (state.join("jobs"), "the agent's state directory"),
        (
            outside.clone(),
            "not below any of [workspaces] allowed_roots",
        ),
        (allowed.join("to-etc"), "system directory (/etc)"),
        (
            allowed.join("to-outside"),
            "not below any of [workspaces] allowed_roots",
        ),
        (rooted.clone(), "owned by root"),
        (mine.clone(), &in_use),
        (allowed.join("missing"), "No such file"),
    ];
    for (path, why) in cases {
        let err = rt
            .block_on(e.start_job(None, &[ws(&path, None)]))
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", path.display()));
        let text = err.to_string();
        assert!(text.contains(why), "{}: {text}", path.display());
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
    assert_eq!(e.list().len(), 1, "a refusal leaves no job behind");
    // The agent goes on serving: a good request still starts.
    rt.block_on(e.teardown(live.id())).unwrap();
    let again = rt.block_on(e.start_job(None, &[ws(&mine, None)])).unwrap();
    rt.block_on(e.teardown(again.id())).unwrap();
}

#[test]
fn a_filesystem_without_idmapped_mounts_is_named_at_create_and_by_doctor() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    // A ramfs an interrupted run left mounted goes first.
    let _ = nix::mount::umount2("/var/lib/bt-ws/ramfs", nix::mount::MntFlags::MNT_DETACH);
    let base = ws_base("ramfs");
    // ramfs cannot make idmapped mounts (ext4, xfs, btrfs and tmpfs can).
    let out = std::process::Command::new("mount")
        .args(["-t", "ramfs", "none"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount ramfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wsp = base.join("checkout");
    owned_dir(&wsp, OWNER, 0o755);
    let e = engine_with_workspaces(7, "fs-ramfs", &[&base]);
    let err = rt
        .block_on(e.start_job(None, &[ws(&wsp, None)]))
        .err()
        .expect("a workspace on ramfs was mounted");
    let kernel = nix::sys::utsname::uname().unwrap();
    let kernel = kernel.release().to_string_lossy();
    let text = err.to_string();
    assert!(
        text.contains("(ramfs)")
            && text.contains(&*kernel)
            && text.contains("cannot make idmapped mounts"),
        "{text}"
    );
    assert!(e.list().is_empty(), "the failed start left a job");
    drop(e);
    let cfg = write_config(7, "fs-ramfs", "");
    let mut file = std::fs::read_to_string(&cfg).unwrap();
    file.push_str(&format!("[workspaces]\nallowed_roots = [{:?}]\n", base));
    std::fs::write(&cfg, file).unwrap();
    let doctor = std::process::Command::new(berth_bin())
        .args(["doctor", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&doctor.stdout);
    let line = said
        .lines()
        .find(|l| l.starts_with("workspaces"))
        .unwrap_or_else(|| panic!("doctor said nothing of workspaces: {said}"));
    assert!(line.contains("FAIL") && line.contains("(ramfs)"), "{said}");
    let out = std::process::Command::new("umount")
        .arg(&base)
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn the_cli_the_job_api_and_a_pipeline_give_jobs_their_workspaces() {
    if !prerequisites() {
        return;
    }
    let base = ws_base("front");
    owned_dir(&base, OWNER, 0o755);
    let wsp = base.join("checkout");
    owned_dir(&wsp, OWNER, 0o755);
    let e = std::sync::Arc::new(engine_with_workspaces(19, "fs-front", &[&base]));
    // With a warm pool: the job is the warm sandbox, its workspace brought
    // in through its drop point.
    let fd = FrontDoor::start_engine(e.clone(), "fs-front", |c| c.warm_pool = 1);
    let warm = loop {
        let ready: Vec<String> = e
            .list()
            .iter()
            .filter(|s| s.status() == berth::sandbox::Status::Running)
            .map(|s| s.id().to_string())
            .collect();
        if let [id] = ready.as_slice() {
            break id.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let w = wsp.display().to_string();
    let job = fd.create_job(&["--workspace", &w]);
    assert_eq!(job.id, warm, "the warm sandbox served the job");
    let ls = fd.job_cli(&["ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listed[0]["workspaces"], serde_json::json!([w]), "{listed}");
    let user = format!("{}:{}", OWNER.0, OWNER.1);
    let vol = format!("{w}:{w}");
    import_busybox_tls(&job);
    docker_tls_ok(
        &job,
        &[
            "run",
            "--rm",
            "-u",
            &user,
            "-v",
            &vol,
            "-w",
            &w,
            "busybox:test",
            "sh",
            "-c",
            "echo api > from-api.txt",
        ],
    );
    let md = std::fs::metadata(wsp.join("from-api.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), OWNER);
    // Brought in later, locked all the same.
    let attack = docker_tls(
        &job,
        &[
            "run",
            "--rm",
            "--privileged",
            "--pid",
            "host",
            "-v",
            &vol,
            "busybox:test",
            "sh",
            "-c",
            &format!(
                "mount -o remount,bind,suid,dev {w} && echo REMOUNTED; \
                 nsenter -t \"$(pidof dockerd)\" -m sh -c 'mount -o remount,bind,suid {w} && echo REMOUNTED; \
                 mount -o remount,bind,suid /run/berth-drop/0 && echo REMOUNTED'; \
                 touch {w}/by-root && echo ROOT-CREATED; true"
            ),
        ],
    );
    let said = String::from_utf8_lossy(&attack.stdout);
    assert!(
        !said.contains("REMOUNTED") && !said.contains("ROOT-CREATED"),
        "{said}"
    );
    // Refusals are the client's: 403 for a directory the agent does not
    // allow, 409 for one a live job has; the CLI prints why.
    let refused = fd.job_cli(&["create", "--workspace", "/etc"]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        text.contains("403") && text.contains("system directory (/etc)"),
        "{text}"
    );
    let taken = fd.job_cli(&["create", "--workspace", &w]);
    let text = String::from_utf8_lossy(&taken.stderr);
    assert!(!taken.status.success());
    assert!(text.contains("409") && text.contains(&job.id), "{text}");
    let rm = fd.job_cli(&["rm", &job.id]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    drop(fd);

    // `berth run`: the pipeline's own directory is its job's workspace.
    let dir = base.join("pipeline");
    owned_dir(&dir, OWNER, 0o755);
    let repo = std::env::var_os("BERTH_TEST_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let base_image = repo.join("pipelines/scripts/busybox-base.sh");
    let steps = format!(
        "name = \"ws\"\n[[step]]\nname = \"write\"\nrun = \"\"\"\
         {} bb:1 && \
         docker run --rm -u {user} -v \"$PWD:$PWD\" -w \"$PWD\" bb:1 sh -c 'echo run > made-by-job.txt' || echo NOT-BOUND\"\"\"\n",
        base_image.display()
    );
    owned_file(&dir.join("ci.toml"), &steps, OWNER, 0o644);
    let cfg = write_config(63, "fs-run", "");
    for (flag, bound) in [(None, true), (Some("--no-workspace"), false)] {
        let _ = std::fs::remove_file(dir.join("made-by-job.txt"));
        let mut cmd = std::process::Command::new(berth_bin());
        cmd.arg("run")
            .arg(dir.join("ci.toml"))
            .arg("--config")
            .arg(&cfg);
        cmd.args(flag);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let made = dir.join("made-by-job.txt");
        assert_eq!(made.exists(), bound, "{flag:?}");
        // Without the workspace, `-v $PWD:$PWD` is a directory the job's
        // dockerd made in the job's own root, root's: the owner's uid
        // cannot write there.
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).contains("NOT-BOUND"),
            !bound,
            "{flag:?}"
        );
        if bound {
            let md = std::fs::metadata(&made).unwrap();
            assert_eq!((md.uid(), md.gid()), OWNER);
        }
    }
    assert!(jobs_left("fs-run").is_empty());
}
