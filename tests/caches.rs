//! Warm starts per project (docs/caches.md): a keyed job starts from a
//! reflink copy of what the key's last commit left, through an idmapped
//! mount onto its own id range; concurrent jobs of one key never see each
//! other's writes; a commit is whole and the later of two wins. Runs as
//! root; fails loudly when a prerequisite is missing.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use berth::sandbox::fs::caches::{Key, ProjectCachesConfig};
use berth::sandbox::{Engine, SandboxConfig};
use common::*;

fn engine_with_caches(cfg: SandboxConfig) -> Engine {
    require_tools(&[(&["mkfs.xfs", "-V"], "apt-get install xfsprogs")]);
    let cfg = SandboxConfig {
        project_caches: ProjectCachesConfig {
            enabled: true,
            total_bytes: cfg.project_caches.total_bytes.min(8 << 30),
            bytes_per_key: cfg.project_caches.bytes_per_key.min(8 << 30),
        },
        ..cfg
    };
    // A pool left by an earlier run starts over: the test counts its keys.
    let pool = cfg.state_dir.join("project-caches");
    let _ = std::process::Command::new("umount")
        .arg(&pool)
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&pool);
    let _ = std::fs::remove_file(cfg.state_dir.join("project-caches.img"));
    Engine::new(cfg).expect("engine")
}

/// The job's images as `name:tag`, sorted.
const IMAGE_NAMES: [&str; 3] = ["images", "--format", "{{.Repository}}:{{.Tag}}"];

fn images(sock: &Path) -> Vec<String> {
    lines(docker_ok(sock, &IMAGE_NAMES))
}

fn lines(text: impl AsRef<str>) -> Vec<String> {
    let mut v: Vec<String> = text.as_ref().lines().map(str::to_string).collect();
    v.sort();
    v
}

/// The whole life of a key on `cfg`'s engine: an empty start, a build and
/// a commit, two concurrent copies, two commits, a job that does not
/// commit.
fn keyed_cycle(cfg: SandboxConfig) {
    let rt = rt();
    let e = engine_with_caches(cfg);
    let key = Key::new("org/app").unwrap();

    // The first job of the key starts empty, builds, and commits.
    let a = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    let s = a.socket();
    assert_eq!(images(&s), Vec::<String>::new());
    import_busybox(&s);
    let ctx = std::env::temp_dir().join(format!("berth-caches-ctx-{}", a.id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:test\nRUN echo built-once > /built\nCMD [\"cat\", \"/built\"]\n",
    )
    .unwrap();
    docker_ok(&s, &["build", "-q", "-t", "app:1", ctx.to_str().unwrap()]);
    docker_ok(
        &s,
        &["volume", "create", "--label", "berth.cache=keep", "kept"],
    );
    docker_ok(&s, &["volume", "create", "dropped"]);
    docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "-v",
            "kept:/k",
            "busybox:test",
            "sh",
            "-c",
            "echo kept > /k/f",
        ],
    );
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--name",
            "left",
            "busybox:test",
            "sleep",
            "1000",
        ],
    );
    // What the run leaves beside the data-root stays with the run.
    let a_root = e.config().state_dir.join("jobs").join(a.id()).join("root");
    for sub in ["tmp", "exec"] {
        // As the job's own root: host root has no id in its disk's mount.
        let id = a.record().host_id.to_string();
        let o = std::process::Command::new("setpriv")
            .args(["--reuid", &id, "--regid", &id, "--clear-groups", "touch"])
            .arg(a_root.join(sub).join("left-by-a"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (_, info) = rt.block_on(e.teardown_committing(a.id())).unwrap();
    assert_eq!(info.key, key);
    assert_eq!(info.committed_by, a.id());

    // Two jobs of the key at once: each has the build and the kept volume,
    // none of the containers or other volumes, and its files carry its own
    // host ids.
    let b = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    let c = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    for j in [&b, &c] {
        let s = j.socket();
        assert_eq!(images(&s), ["app:1", "busybox:test"]);
        assert_eq!(
            docker_ok(&s, &["run", "--rm", "app:1"]).trim(),
            "built-once"
        );
        assert_eq!(lines(docker_ok(&s, &["volume", "ls", "-q"])), ["kept"]);
        assert_eq!(
            docker_ok(
                &s,
                &[
                    "run",
                    "--rm",
                    "-v",
                    "kept:/k",
                    "busybox:test",
                    "cat",
                    "/k/f"
                ]
            )
            .trim(),
            "kept"
        );
        assert_eq!(
            docker_ok(&s, &["ps", "-aq", "--filter", "name=left"]).trim(),
            ""
        );
        let data = e
            .config()
            .state_dir
            .join("jobs")
            .join(j.id())
            .join("root/data");
        assert_eq!(std::fs::metadata(&data).unwrap().uid(), j.record().host_id);
        for sub in ["tmp", "exec"] {
            assert!(!data.with_file_name(sub).join("left-by-a").exists());
        }
    }
    assert_ne!(b.record().host_id, c.record().host_id);

    // What one writes, the other does not see.
    docker_ok(&b.socket(), &["tag", "app:1", "app:from-b"]);
    assert!(!images(&c.socket()).contains(&"app:from-b".to_string()));

    // Both commit: the later commit is the key's state, whole.
    rt.block_on(e.teardown_committing(b.id())).unwrap();
    docker_ok(&c.socket(), &["tag", "app:1", "app:from-c"]);
    rt.block_on(e.teardown_committing(c.id())).unwrap();
    let d = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    assert_eq!(images(&d.socket()), ["app:1", "app:from-c", "busybox:test"]);

    // A job that ends without a commit leaves the key as it was.
    docker_ok(&d.socket(), &["tag", "app:1", "app:from-d"]);
    rt.block_on(e.teardown(d.id())).unwrap();
    let f = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    assert_eq!(images(&f.socket()), ["app:1", "app:from-c", "busybox:test"]);
    let traces = Traces::capture(&e, &f);
    rt.block_on(e.teardown(f.id())).unwrap();
    traces.assert_gone();

    // Nothing of a job is left in the pool, and the key has one state.
    let pool = e.config().state_dir.join("project-caches");
    assert_eq!(std::fs::read_dir(pool.join("jobs")).unwrap().count(), 0);
    let keys = berth::sandbox::fs::caches::Store::open(&pool.join("keys"))
        .unwrap()
        .0
        .list()
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].committed_by, c.id());
    let _ = std::fs::remove_dir_all(&ctx);
}

#[test]
fn a_keyed_job_starts_from_the_last_commit_and_concurrent_copies_stay_apart() {
    if !prerequisites() {
        return;
    }
    keyed_cycle(engine_config(78, "caches"));
}

#[test]
fn a_keyed_job_starts_from_the_last_commit_on_debian13s_engine() {
    if !prerequisites() {
        return;
    }
    keyed_cycle(with_debian13_engine(engine_config(80, "caches-d13")));
}

#[test]
fn a_cache_key_without_project_caches_is_refused_with_the_setting() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine(79, "caches-off");
    let key = Key::new("org/app").unwrap();
    let err = rt
        .block_on(e.start_keyed(None, &[], Some(&key)))
        .err()
        .expect("a keyed job without project caches")
        .to_string();
    assert!(
        err.contains(
            "cache_key: this agent keeps no project caches ([project_caches] enabled = true"
        ),
        "{err}"
    );
}

fn tls_images(job: &TlsJob) -> Vec<String> {
    lines(docker_tls_ok(job, &IMAGE_NAMES))
}

/// Through the front door, as a CI system drives it: `berth job create
/// --cache-key`, the docker CLI over mutual TLS, `berth job rm --outcome`.
/// A failed job does not commit; a successful one does; a job started with
/// `--cache-from` reads the key and never writes it; options that do not
/// go together are refused.
#[test]
fn the_cli_commits_on_success_and_cache_from_never_writes() {
    if !prerequisites() {
        return;
    }
    let e = std::sync::Arc::new(engine_with_caches(engine_config(81, "caches-door")));
    let fd = FrontDoor::start_engine(e, "caches-door", |_| {});
    let rm = |id: &str, outcome: &str| {
        let o = fd.job_cli(&["rm", id, "--outcome", outcome]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let busybox = busybox_tar();

    // A failing job of the key: nothing committed.
    let a = fd.create_job(&["--cache-key", "org/app"]);
    assert_eq!(tls_images(&a), Vec::<String>::new());
    let o = docker_tls_stdin(&a, &["import", "-", "busybox:test"], Some(busybox));
    assert!(o.status.success());
    rm(&a.id, "failure");
    let b = fd.create_job(&["--cache-key", "org/app"]);
    assert_eq!(tls_images(&b), Vec::<String>::new());

    // A successful one: committed.
    let o = docker_tls_stdin(&b, &["import", "-", "busybox:test"], Some(busybox));
    assert!(o.status.success());
    rm(&b.id, "success");
    let c = fd.create_job(&["--cache-from", "org/app"]);
    assert_eq!(tls_images(&c), ["busybox:test"]);

    // A reader's success commits nothing.
    docker_tls_ok(&c, &["tag", "busybox:test", "from-a-pull-request:1"]);
    rm(&c.id, "success");
    let d = fd.create_job(&["--cache-key", "org/app", "--cache-commit", "never"]);
    assert_eq!(tls_images(&d), ["busybox:test"]);
    rm(&d.id, "success");

    // Another key sees none of it.
    let other = fd.create_job(&["--cache-key", "org/other"]);
    assert_eq!(tls_images(&other), Vec::<String>::new());
    rm(&other.id, "failure");

    // The options that do not go together: refused before any job starts.
    for (args, why) in [
        (
            vec!["--cache-commit", "always"],
            "cache_commit needs cache_key",
        ),
        (
            vec!["--cache-key", "a", "--cache-from", "b"],
            "cannot be used with",
        ),
    ] {
        let o = fd.job_cli(&[&["create"][..], &args[..]].concat());
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{err}");
    }
    let o = fd.job_cli(&["rm", "0123456789ab", "--outcome", "maybe"]);
    assert!(!o.status.success());

    // `berth cache ls` and `rm`: the one committed key, then none; a job
    // of the removed key starts empty.
    let cache_cli = |args: &[&str]| {
        std::process::Command::new(berth_bin())
            .arg("cache")
            .args(args)
            .args(["--endpoint", &fd.endpoint()])
            .arg("--certs-dir")
            .arg(&fd.certs)
            .output()
            .unwrap()
    };
    let o = cache_cli(&["ls", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["key"], "org/app");
    assert_eq!(keys[0]["committed_by"], b.id.as_str());
    let m = scrape(&fd);
    assert_eq!(
        sample(&m, "berth_project_cache_keys", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "berth_project_cache_bytes", &[]),
        keys[0]["bytes"].as_f64(),
        "{m}"
    );
    let o = cache_cli(&["rm", "org/app"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cache_cli(&["rm", "org/app"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no project cache for key org/app"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let e = fd.create_job(&["--cache-key", "org/app"]);
    assert_eq!(tls_images(&e), Vec::<String>::new());
    rm(&e.id, "failure");

    // The metrics: keyed starts by result, commits.
    let m = scrape(&fd);
    for (name, labels, want) in [
        (
            "berth_project_cache_starts_total",
            &[("result", "hit")][..],
            2.0,
        ),
        (
            "berth_project_cache_starts_total",
            &[("result", "miss")],
            4.0,
        ),
        (
            "berth_project_cache_commits_total",
            &[("result", "committed")],
            1.0,
        ),
        ("berth_project_cache_commit_seconds_count", &[], 1.0),
        ("berth_project_cache_snapshot_seconds_count", &[], 6.0),
        ("berth_project_cache_keys", &[], 0.0),
    ] {
        assert_eq!(
            sample(&m, name, labels),
            Some(want),
            "{name} {labels:?} in {m}"
        );
    }
}

/// A CI platform's token gets the project cache its rule names, made of
/// the token's claims: a protected branch's job commits when it ends
/// itself with success; a pull request's job starts from the same key and
/// never writes it, whatever it asks or reports.
#[test]
fn a_tokens_rule_names_its_jobs_key_and_whether_they_commit() {
    if !prerequisites() {
        return;
    }
    const ISS: &str = "https://ci.example.test";
    let keys_dir = std::path::PathBuf::from("/var/lib/bt/caches-token-keys");
    let _ = std::fs::remove_dir_all(&keys_dir);
    std::fs::create_dir_all(&keys_dir).unwrap();
    let signer = test_key(&keys_dir, jsonwebtoken::Algorithm::ES256, "ec-1");
    let jwks = keys_dir.join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [jwk(&signer)] }).to_string(),
    )
    .unwrap();
    let token_cfg: berth::oidc::TokenConfig = toml::from_str(&format!(
        r#"
enabled = true
listen = "127.0.0.1:0"
[[issuers]]
issuer = "{ISS}"
jwks_file = {jwks:?}
[[rules]]
name = "main"
issuer = "{ISS}"
claims = {{ repository = "acme/*", ref = "refs/heads/main" }}
cache_key = "ci/{{repository}}"
cache_write = true
[[rules]]
name = "pull-requests"
issuer = "{ISS}"
claims = {{ repository = "acme/*", ref = "refs/pull/*" }}
cache_key = "ci/{{repository}}"
[[rules]]
name = "deploys"
issuer = "{ISS}"
claims = {{ repository = "acme/*", ref = "refs/tags/*" }}
cache_key = "deploy/{{environment}}"
cache_write = true
[[rules]]
name = "others"
issuer = "{ISS}"
claims = {{ repository = "*" }}
"#
    ))
    .unwrap();
    let e = std::sync::Arc::new(engine_with_caches(engine_config(88, "caches-token")));
    let fd = FrontDoor::start_engine(e, "caches-token", |c| c.token = token_cfg);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let n = std::sync::atomic::AtomicU32::new(0);
    let token = |repository: &str, git_ref: &str| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let jwt = mint(
            &signer,
            &serde_json::json!({
                "iss": ISS, "aud": "berth", "sub": format!("repo:{repository}"),
                "repository": repository, "ref": git_ref,
                "iat": now, "exp": now + 600, "jti": format!("jti-{i}"),
            }),
        );
        let f = keys_dir.join(format!("t{i}"));
        std::fs::write(&f, jwt).unwrap();
        f
    };
    let exchange = |token: &Path, extra: &[&str]| fd.create_with_token(token, extra);
    let job_of = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        TlsJob::from_create_json(&v, v["cert_path"].as_str().unwrap().into())
    };
    // The job ends itself, as a CI job's last step does: `berth job end`
    // with the variables `job create` printed.
    let end = |job: &TlsJob, outcome: &str| {
        std::process::Command::new(berth_bin())
            .args(["job", "end", "--outcome", outcome])
            .env("DOCKER_HOST", &job.endpoint)
            .env("DOCKER_CERT_PATH", &job.dir)
            .output()
            .unwrap()
    };
    let ended = |job: &TlsJob, outcome: &str| {
        let o = end(job, outcome);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let keys = || {
        let o = std::process::Command::new(berth_bin())
            .args(["cache", "ls", "--json", "--endpoint", &fd.endpoint()])
            .arg("--certs-dir")
            .arg(&fd.certs)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
        lines(
            v.iter()
                .map(|k| k["key"].as_str().unwrap().to_string() + "\n")
                .collect::<String>(),
        )
    };
    let busybox = busybox_tar();

    // main's first job: the key is empty; it builds, fails, and ends so:
    // nothing is committed. Its next job succeeds: committed.
    let a = job_of(exchange(&token("acme/app", "refs/heads/main"), &[]));
    assert_eq!(tls_images(&a), Vec::<String>::new());
    let o = docker_tls_stdin(&a, &["import", "-", "main:1"], Some(busybox));
    assert!(o.status.success());
    ended(&a, "failure");
    assert_eq!(keys(), Vec::<String>::new());
    // Its certificate ended with it.
    let o = end(&a, "success");
    assert!(!o.status.success());
    let b = job_of(exchange(&token("acme/app", "refs/heads/main"), &[]));
    let o = docker_tls_stdin(&b, &["import", "-", "main:1"], Some(busybox));
    assert!(o.status.success());
    ended(&b, "success");
    assert_eq!(keys(), ["ci/acme/app"]);

    // A pull request's token: asking to commit is refused before the token
    // is spent; the same token then gets a job that starts from main's
    // state, and its success commits nothing.
    let pr = token("acme/app", "refs/pull/7/merge");
    let o = exchange(&pr, &["--cache-commit", "on-success"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("403") && err.contains("never commit to it"),
        "{err}"
    );
    let c = job_of(exchange(&pr, &[]));
    assert_eq!(tls_images(&c), ["main:1"]);
    docker_tls_ok(&c, &["tag", "main:1", "from-a-pull-request:1"]);
    ended(&c, "success");
    let d = job_of(exchange(&token("acme/app", "refs/heads/main"), &[]));
    assert_eq!(tls_images(&d), ["main:1"]);

    // Another repository's main: its own key, empty.
    let other = job_of(exchange(&token("acme/lib", "refs/heads/main"), &[]));
    assert_eq!(tls_images(&other), Vec::<String>::new());
    ended(&other, "failure");

    // A token cannot pick the key: with --token the CLI refuses one, and
    // the exchange takes no cache_key field.
    let t = token("acme/app", "refs/pull/8/merge");
    let o = exchange(&t, &["--cache-key", "ci/acme/lib"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("rule names the project cache"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A rule's key made of a claim the token lacks: refused, saying so.
    let o = exchange(&token("acme/app", "refs/tags/v1"), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("403") && err.contains("no claim \"environment\""),
        "{err}"
    );
    // A rule with no cache grants no commit.
    let o = exchange(
        &token("someone/else", "refs/heads/main"),
        &["--cache-commit", "always"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("grants no project cache"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A job's certificate ends its own job and nothing else: the one path,
    // DELETE only, unversioned, with a valid outcome; another job's path
    // stays the admin's.
    let other = job_of(exchange(&token("acme/app", "refs/pull/9/merge"), &[]));
    for (request, status) in [
        ("GET /berth/v1/job", "405"),
        ("DELETE /berth/v1/job?outcome=maybe", "400"),
        ("DELETE /berth/v1/job?id=x", "400"),
        ("DELETE /v1.41/berth/v1/job?outcome=success", "403"),
        ("DELETE /berth/v1/job/", "403"),
        (&format!("DELETE /berth/v1/jobs/{}", other.id), "403"),
    ] {
        let raw = rt()
            .block_on(tls_request(
                fd.port,
                &d.dir,
                format!("{request} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            ))
            .unwrap();
        let head = String::from_utf8_lossy(&raw);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{request}: {head}"
        );
    }
    assert_eq!(tls_images(&other), ["main:1"]);
    assert_eq!(tls_images(&d), ["main:1"]);
    ended(&other, "failure");
    ended(&d, "failure");
    assert_eq!(keys(), ["ci/acme/app"]);
    let audit = fd.job_cli(&["audit", &b.id, "--json"]);
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("end-requested"),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

/// Keyed jobs' disks live in the pool beside the keys: with the agent's
/// own XFS image, the pool grows as they start, so that two jobs writing
/// up to their disk bounds at once both fit though the keys' bound is
/// small.
#[test]
fn keyed_jobs_writing_to_their_bounds_at_once_find_room_in_the_pool() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let mut cfg = engine_config(92, "caches-grow");
    cfg.project_caches.total_bytes = 256 << 20;
    cfg.project_caches.bytes_per_key = 256 << 20;
    let e = engine_with_caches(cfg);
    let pool = e.project_caches().expect("caches on");
    let before = pool.size().unwrap();
    // The keys' bound and XFS's own room; less than the two disks below.
    assert!(before < (256 << 20) + (2 << 30), "{before}");
    let key = Key::new("grow").unwrap();
    let limits = berth::sandbox::Limits {
        disk_bytes: Some(1 << 30),
        ..Default::default()
    };
    let jobs: Vec<_> = (0..2)
        .map(|_| {
            rt.block_on(e.start_keyed(Some(limits.clone()), &[], Some(&key)))
                .unwrap()
        })
        .collect();
    let grown = pool.size().unwrap();
    assert!(grown >= (256 << 20) + (2 << 30), "{grown}");
    std::thread::scope(|sc| {
        for j in &jobs {
            let s = j.socket();
            sc.spawn(move || {
                import_busybox(&s);
                docker_ok(
                    &s,
                    &[
                        "run",
                        "--rm",
                        "busybox:test",
                        "sh",
                        "-c",
                        "dd if=/dev/zero of=/fill bs=1M count=700 && sync",
                    ],
                );
            });
        }
    });
    for j in jobs {
        rt.block_on(e.teardown(j.id())).unwrap();
    }
    // A third job finds the room the first two left.
    let j = rt
        .block_on(e.start_keyed(Some(limits), &[], Some(&key)))
        .unwrap();
    assert_eq!(pool.size().unwrap(), grown);
    rt.block_on(e.teardown(j.id())).unwrap();
}

/// A commit above `bytes_per_key` is refused and the key keeps its state;
/// past `total_bytes`, the least recently used other key goes.
#[test]
fn the_stores_bounds_refuse_a_large_commit_and_evict_the_least_recently_used_key() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let mut cfg = engine_config(82, "caches-bounds");
    cfg.project_caches.bytes_per_key = 160 << 20;
    cfg.project_caches.total_bytes = 8 << 30;
    let e = engine_with_caches(cfg);
    let (small, big) = (Key::new("small").unwrap(), Key::new("big").unwrap());
    for key in [&small, &big] {
        let j = rt.block_on(e.start_keyed(None, &[], Some(key))).unwrap();
        import_busybox(&j.socket());
        // 70 MiB kept: states above the smallest total_bytes (64 MiB).
        docker_ok(
            &j.socket(),
            &["volume", "create", "--label", "berth.cache=keep", "ballast"],
        );
        docker_ok(
            &j.socket(),
            &[
                "run",
                "--rm",
                "-v",
                "ballast:/b",
                "busybox:test",
                "dd",
                "if=/dev/urandom",
                "of=/b/x",
                "bs=1M",
                "count=70",
            ],
        );
        let (_, info) = rt.block_on(e.teardown_committing(j.id())).unwrap();
        assert!(info.bytes < 160 << 20, "{info:?}");
    }
    // 200 MiB more in a kept volume: above the bound.
    let j = rt.block_on(e.start_keyed(None, &[], Some(&big))).unwrap();
    let s = j.socket();
    docker_ok(
        &s,
        &["volume", "create", "--label", "berth.cache=keep", "fat"],
    );
    docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "-v",
            "fat:/f",
            "busybox:test",
            "dd",
            "if=/dev/urandom",
            "of=/f/x",
            "bs=1M",
            "count=200",
        ],
    );
    let err = rt
        .block_on(e.teardown_committing(j.id()))
        .expect_err("a commit above bytes_per_key")
        .to_string();
    assert!(
        err.contains("above bytes_per_key (167772160); the key keeps its state"),
        "{err}"
    );
    let j = rt.block_on(e.start_keyed(None, &[], Some(&big))).unwrap();
    // The state from before: its ballast, not the refused job's volume.
    assert_eq!(
        lines(docker_ok(&j.socket(), &["volume", "ls", "-q"])),
        ["ballast"]
    );
    rt.block_on(e.teardown(j.id())).unwrap();
    let pool = e.config().state_dir.join("project-caches");
    assert_eq!(std::fs::read_dir(pool.join("jobs")).unwrap().count(), 0);

    // The same store with room for about one key: the next commit of
    // `big` evicts `small`, used least recently.
    let store = || {
        berth::sandbox::fs::caches::Store::open(&pool.join("keys"))
            .unwrap()
            .0
            .list()
            .unwrap()
            .into_iter()
            .map(|k| (k.key.to_string(), k.bytes))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = store();
    assert_eq!(before.keys().collect::<Vec<_>>(), ["big", "small"]);
    let mut cfg = e.config().clone();
    drop(e);
    cfg.project_caches.total_bytes = before["big"] + before["small"] / 2;
    cfg.project_caches.bytes_per_key = cfg.project_caches.total_bytes;
    let e = Engine::new(cfg).expect("engine");
    let j = rt.block_on(e.start_keyed(None, &[], Some(&big))).unwrap();
    rt.block_on(e.teardown_committing(j.id())).unwrap();
    assert_eq!(store().keys().collect::<Vec<_>>(), ["big"]);
}

/// A job of key Q finds nothing of key P, not from a `--privileged`
/// container with the job's whole root bound in: no file holding what P's
/// jobs wrote, no loop device, no mount of the pool, while a job of P runs
/// from its copy beside it.
#[test]
fn a_job_of_one_key_finds_nothing_of_another_key() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine_with_caches(engine_config(83, "caches-apart"));
    let (p, q) = (Key::new("proj/p").unwrap(), Key::new("proj/q").unwrap());
    let marker = format!("marker-of-p-{}", std::process::id());
    let a = rt.block_on(e.start_keyed(None, &[], Some(&p))).unwrap();
    import_busybox(&a.socket());
    let ctx = std::env::temp_dir().join(format!("berth-caches-apart-{}", a.id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox:test\nRUN echo {marker} > /m\n"),
    )
    .unwrap();
    docker_ok(
        &a.socket(),
        &["build", "-q", "-t", "p:1", ctx.to_str().unwrap()],
    );
    rt.block_on(e.teardown_committing(a.id())).unwrap();
    let _ = std::fs::remove_dir_all(&ctx);

    let running_p = rt.block_on(e.start_keyed(None, &[], Some(&p))).unwrap();
    assert!(images(&running_p.socket()).contains(&"p:1".to_string()));
    let jq = rt.block_on(e.start_keyed(None, &[], Some(&q))).unwrap();
    import_busybox(&jq.socket());
    let look = |script: &str| {
        docker_ok(
            &jq.socket(),
            &[
                "run",
                "--rm",
                "--privileged",
                "-v",
                "/:/host",
                "busybox:test",
                "sh",
                "-c",
                script,
            ],
        )
    };
    // busybox find and grep: every file of the job's view but the
    // kernel's own trees, the host's read-only system directories, and
    // running containers' roots (the searching one holds /host again). The pattern matches the marker, never itself:
    // the search's own command line is in files of the job too.
    let (head, tail) = marker.split_at(1);
    let grep = format!(
        "find /host \\( -path /host/proc -o -path /host/sys -o -path /host/dev \
         -o -path /host/usr -o -path /host/opt -o -path '*/merged' \\) -prune -o -type f -exec grep -l '[{head}]{tail}' {{}} + \
         2>/dev/null; true"
    );
    assert_eq!(look(&grep), "", "files holding key P's marker");
    // The same search in P's job finds its layer: the search can find.
    let in_p = docker_ok(
        &running_p.socket(),
        &[
            "run",
            "--rm",
            "--privileged",
            "-v",
            "/:/host",
            "busybox:test",
            "sh",
            "-c",
            &grep,
        ],
    );
    assert!(in_p.contains("/host/var/lib/berth/data/"), "{in_p}");
    assert_eq!(look("ls /dev /host/dev | grep -i loop; true"), "");
    // Mounted: the job's own disk (one loop device, idmapped), never the
    // pool.
    let mounts = look("cat /proc/mounts");
    assert!(!mounts.contains("project-caches"), "{mounts}");
    let loops: std::collections::BTreeSet<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|d| d.starts_with("/dev/loop"))
        .collect();
    assert_eq!(loops.len(), 1, "{mounts}");
    // The job's dockerd keeps its data below /var/lib/berth (and docker:
    // dind's /var/lib/docker) in its root; nothing else of the host's.
    assert_eq!(lines(look("ls -A /host/var/lib")), ["berth", "docker"]);
    let traces = Traces::capture(&e, &jq);
    rt.block_on(e.teardown(jq.id())).unwrap();
    traces.assert_gone();
    rt.block_on(e.teardown(running_p.id())).unwrap();
}

/// `berth run` of a pipeline with `[cache]`: its second run starts from
/// what the first committed; a failing run commits nothing; `--no-cache`
/// starts empty; `--cache-from` reads the key and never writes it.
#[test]
fn a_pipelines_cache_makes_its_next_run_warm() {
    if !prerequisites() {
        return;
    }
    require_tools(&[(&["mkfs.xfs", "-V"], "apt-get install xfsprogs")]);
    let name = "caches-run";
    let state = engine_config(89, name).state_dir;
    let pool = state.join("project-caches");
    let forget_pool = || {
        let _ = std::process::Command::new("umount")
            .arg(&pool)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&pool);
        let _ = std::fs::remove_file(state.join("project-caches.img"));
    };
    forget_pool();
    let cfg = write_config(
        89,
        name,
        "\n[project_caches]\ntotal_bytes = 8589934592\nbytes_per_key = 4294967296\n",
    );
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::path::PathBuf::from("/var/lib/bt/pipelines-caches-run");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pipeline.toml");
    std::fs::write(
        &file,
        format!(
            r#"
name = "warm"
[cache]
key = "pipelines/warm"
[[step]]
name = "base"
run = '''
if docker image inspect warm:1 >/dev/null 2>&1; then echo "STARTED WARM"; else echo "STARTED COLD"; {base} warm:1; fi
docker images --format 'IMAGE {{{{.Repository}}}}:{{{{.Tag}}}}'
'''
[[step]]
name = "more"
run = 'docker tag warm:1 "$TAG" && test "$FAIL" != 1'
env = {{ TAG = "warm:1", FAIL = "0" }}
"#,
            base = repo.join("pipelines/scripts/busybox-base.sh").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let o = std::process::Command::new(berth_bin())
            .arg("run")
            .arg(&file)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        (o.status.success(), text)
    };
    let ok = |args: &[&str]| {
        let (passed, text) = run(args, &[]);
        assert!(passed, "{text}");
        text
    };

    let first = ok(&[]);
    assert!(first.contains("STARTED COLD"), "{first}");
    assert!(
        first.contains("starts from project cache pipelines/warm; it commits if every step passes"),
        "{first}"
    );
    let second = ok(&[]);
    assert!(second.contains("STARTED WARM"), "{second}");

    // A failing run (its last step fails after tagging) commits nothing.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sed -i 's/FAIL = \"0\"/FAIL = \"1\"/; s/TAG = \"warm:1\"/TAG = \"broken:1\"/' {}",
            file.display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    let (passed, text) = run(&[], &[]);
    assert!(!passed, "{text}");
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("FAIL = \"1\"", "FAIL = \"0\"")
            .replace("TAG = \"broken:1\"", "TAG = \"reader:1\""),
    )
    .unwrap();

    // A reader: starts warm, without the failed run's tag; its success
    // commits nothing either.
    let read = ok(&["--cache-from", "pipelines/warm"]);
    assert!(read.contains("STARTED WARM"), "{read}");
    assert!(!read.contains("IMAGE broken:1"), "{read}");
    assert!(read.contains("never commits to it"), "{read}");
    let after = ok(&["--cache-commit", "never"]);
    assert!(after.contains("STARTED WARM"), "{after}");
    assert!(!after.contains("IMAGE reader:1"), "{after}");

    // --no-cache: empty, whatever the file says.
    let fresh = ok(&["--no-cache"]);
    assert!(fresh.contains("STARTED COLD"), "{fresh}");
    assert!(!fresh.contains("project cache"), "{fresh}");
    let (passed, text) = run(&["--no-cache", "--cache-key", "x"], &[]);
    assert!(!passed, "{text}");
    assert!(jobs_left(name).is_empty(), "{:?}", jobs_left(name));

    // `berth doctor` of the same agent with project caches on: the pool it
    // made and its key; then, with no pool yet and no xfsprogs to make
    // one, a failure naming the fix.
    let on = dir.join("doctor.toml");
    std::fs::write(
        &on,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[project_caches]\n", "[project_caches]\nenabled = true\n"),
    )
    .unwrap();
    let doctor = |path: Option<&str>| {
        let mut c = std::process::Command::new(berth_bin());
        c.args(["doctor", "--listen", "127.0.0.1:0", "--config"])
            .arg(&on);
        if let Some(p) = path {
            c.env("PATH", p);
        }
        let o = c.output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let line = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
            .to_string()
    };
    let text = doctor(None);
    let pool_line = line(&text, "project caches ");
    assert!(
        pool_line.contains("ok") && pool_line.contains("the pool is an XFS image the agent made"),
        "{text}"
    );
    assert!(
        line(&text, "project cache room").contains("keys: 1;"),
        "{text}"
    );
    forget_pool();
    let text = doctor(Some("/nonexistent"));
    let pool_line = line(&text, "project caches ");
    assert!(
        pool_line.contains("mkfs.xfs, xfs_growfs, losetup missing"),
        "{text}"
    );
    assert!(text.contains("apt-get install xfsprogs"), "{text}");
}

/// The agent killed (SIGKILL) at moments spread across a commit: each time
/// the next agent finds the key at its old state or its new one, whole
/// (every image and the kept volume's content of one commit, never a mix),
/// recovers the interrupted job, and leaves nothing behind.
#[test]
fn an_agent_killed_during_a_commit_leaves_the_key_old_or_new_never_a_mix() {
    if !prerequisites() {
        return;
    }
    require_tools(&[(&["mkfs.xfs", "-V"], "apt-get install xfsprogs")]);
    let name = "caches-kill";
    let state = engine_config(93, name).state_dir;
    let pool = state.join("project-caches");
    let _ = std::process::Command::new("umount")
        .arg(&pool)
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&pool);
    let _ = std::fs::remove_file(state.join("project-caches.img"));
    let cfg = write_config(
        93,
        name,
        "\n[project_caches]\nenabled = true\ntotal_bytes = 8589934592\nbytes_per_key = 4294967296\n[serve]\nwarm_pool = 0\n",
    );
    let certs = std::path::PathBuf::from(format!("/var/lib/bt/{name}-certs"));
    let log = std::path::PathBuf::from(format!("/var/lib/bt/{name}-agent.log"));
    let start = || Agent::start(&cfg, &certs, &log);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // What the key holds: its images and the kept volume's content.
    let state_of = |agent: &Agent| {
        let j = agent.create(&["--cache-from", "k"]);
        // An empty key has no volume to read.
        let found = if tls_images(&j).is_empty() {
            (Vec::new(), String::new())
        } else {
            state_of_job(&j)
        };
        let o = agent.cli(&["job", "rm", &j.id]);
        assert!(o.status.success(), "{}", text(&o));
        found
    };

    // The first state: busybox and round 0, committed by a live agent.
    let mut agent = start();
    let j = agent.create(&["--cache-key", "k"]);
    let o = docker_tls_stdin(&j, &["import", "-", "busybox:test"], Some(busybox_tar()));
    assert!(o.status.success());
    let fill = |j: &TlsJob, round: usize| {
        docker_tls_ok(
            j,
            &["volume", "create", "--label", "berth.cache=keep", "kept"],
        );
        docker_tls_ok(
            j,
            &[
                "run",
                "--rm",
                "-v",
                "kept:/k",
                "busybox:test",
                "sh",
                "-c",
                &format!(
                    "echo {round} > /k/round && dd if=/dev/urandom of=/k/ballast bs=1M count=64 2>/dev/null"
                ),
            ],
        )
    };
    fill(&j, 0);
    let o = agent.cli(&["job", "rm", &j.id, "--outcome", "success"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut now = state_of(&agent);
    assert_eq!(now.0, ["busybox:test"]);
    assert!(now.1.starts_with("0\n"), "{:?}", now.1);

    // Kill moments from the request's arrival to past the commit's end.
    let (mut old, mut new) = (0, 0);
    for (round, delay_ms) in (1..=8).zip((0..).step_by(500)) {
        let j = agent.create(&["--cache-key", "k"]);
        docker_tls_ok(&j, &["tag", "busybox:test", &format!("round-{round}:1")]);
        fill(&j, round);
        let after = state_of_job(&j);
        let rm = std::process::Command::new(berth_bin())
            .args(["job", "rm", &j.id, "--outcome", "success"])
            .args(["--endpoint", &agent.endpoint()])
            .arg("--certs-dir")
            .arg(&certs)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        agent.kill();
        let mut rm = rm;
        let _ = rm.wait();

        agent = start();
        let found = state_of(&agent);
        if found == now {
            old += 1;
        } else {
            assert_eq!(
                found, after,
                "round {round}: neither the old state nor the new"
            );
            new += 1;
            now = found;
        }
        assert!(
            !std::fs::read_dir(pool.join("jobs"))
                .unwrap()
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "commit")),
            "a disk on its way to a commit was left"
        );
    }
    eprintln!("kill trials: {old} left the old state, {new} the new");
    // The interrupted jobs are recovered: none is left once the agent is
    // done, and the key holds one generation.
    agent.stop();
    assert!(jobs_left(name).is_empty(), "{:?}", jobs_left(name));
    let keys: Vec<_> = std::fs::read_dir(pool.join("keys"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(keys.len(), 1);
    let gens = std::fs::read_dir(keys[0].path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .count();
    assert_eq!(gens, 1);
    assert_eq!(
        std::fs::read_dir(pool.join("jobs")).unwrap().count(),
        0,
        "a job's disk was left in the pool"
    );
}

/// A keyed job's images and kept volume, as `state_of` reads a key.
fn state_of_job(j: &TlsJob) -> (Vec<String>, String) {
    let kept = docker_tls_ok(
        j,
        &[
            "run",
            "--rm",
            "-v",
            "kept:/k",
            "busybox:test",
            "sh",
            "-c",
            "cat /k/round && sha256sum /k/ballast | cut -c1-64",
        ],
    );
    (tls_images(j), kept)
}

/// A keyed job whose key holds the agent's preloaded images, under their
/// names, does not load the archives again; one whose key lost a name
/// does.
#[test]
fn a_keyed_job_loads_only_the_preloads_its_key_lacks() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let save = std::path::PathBuf::from("/var/lib/bt/caches-preload-save.tar");
    {
        let e = Engine::new(engine_config(94, "caches-preload-src")).unwrap();
        let sb = rt.block_on(e.start(None)).unwrap();
        import_busybox(&sb.socket());
        docker_ok(&sb.socket(), &["tag", "busybox:test", "preloaded:1"]);
        let out = docker(&sb.socket(), &["save", "preloaded:1"]);
        assert!(out.status.success());
        std::fs::write(&save, &out.stdout).unwrap();
        rt.block_on(e.teardown(sb.id())).unwrap();
    }
    let mut cfg = engine_config(94, "caches-preload");
    cfg.preload = vec![save];
    let e = engine_with_caches(cfg);
    let key = Key::new("preloads").unwrap();
    // The image events of the job's dockerd since it started.
    let loads = |s: &Path| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 1;
        docker_ok(
            s,
            &[
                "events",
                "--since",
                "0",
                "--until",
                &now.to_string(),
                "--filter",
                "type=image",
                "--format",
                "{{.Action}}",
            ],
        )
        .lines()
        .filter(|a| *a == "load")
        .count()
    };
    let a = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    assert_eq!(images(&a.socket()), ["preloaded:1"]);
    assert_eq!(loads(&a.socket()), 1);
    rt.block_on(e.teardown_committing(a.id())).unwrap();

    let b = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    assert_eq!(images(&b.socket()), ["preloaded:1"]);
    assert_eq!(loads(&b.socket()), 0, "the key's images were loaded again");
    docker_ok(&b.socket(), &["tag", "preloaded:1", "other:1"]);
    docker_ok(&b.socket(), &["rmi", "preloaded:1"]);
    rt.block_on(e.teardown_committing(b.id())).unwrap();

    let c = rt.block_on(e.start_keyed(None, &[], Some(&key))).unwrap();
    assert_eq!(images(&c.socket()), ["other:1", "preloaded:1"]);
    assert_eq!(loads(&c.socket()), 1);
    rt.block_on(e.teardown(c.id())).unwrap();
}

/// A keyed job's own disk bound holds on top of its copy, whatever bound
/// the committing job had: the copy grows to a larger bound, shrinks to a
/// smaller one that holds the state, and a bound too small for the state
/// is refused as the request's fault, naming the key.
#[test]
fn a_keyed_jobs_own_disk_bound_holds_on_top_of_its_copy() {
    if !prerequisites() {
        return;
    }
    let rt = rt();
    let e = engine_with_caches(engine_config(95, "caches-fit"));
    let key = Key::new("fit").unwrap();
    let gib = |b: u64| berth::sandbox::Limits {
        disk_bytes: Some(b),
        ..Default::default()
    };
    // The job's disk as the job sees it: its filesystem's size.
    let size = |j: &berth::sandbox::Sandbox| {
        let root = e.config().state_dir.join("jobs").join(j.id()).join("root");
        let st = nix::sys::statvfs::statvfs(&root).unwrap();
        st.blocks() * st.fragment_size()
    };
    let a = rt
        .block_on(e.start_keyed(Some(gib(2 << 30)), &[], Some(&key)))
        .unwrap();
    import_busybox(&a.socket());
    docker_ok(
        &a.socket(),
        &["volume", "create", "--label", "berth.cache=keep", "kept"],
    );
    docker_ok(
        &a.socket(),
        &[
            "run",
            "--rm",
            "-v",
            "kept:/k",
            "busybox:test",
            "dd",
            "if=/dev/urandom",
            "of=/k/x",
            "bs=1M",
            "count=100",
        ],
    );
    rt.block_on(e.teardown_committing(a.id())).unwrap();

    for bound in [3u64 << 30, 1 << 30] {
        let j = rt
            .block_on(e.start_keyed(Some(gib(bound)), &[], Some(&key)))
            .unwrap();
        let s = size(&j);
        // The filesystem's own metadata aside.
        assert!(s <= bound && s > bound / 10 * 9, "bound {bound}: {s}");
        assert_eq!(images(&j.socket()), ["busybox:test"]);
        assert_eq!(
            docker_ok(
                &j.socket(),
                &[
                    "run",
                    "--rm",
                    "-v",
                    "kept:/k",
                    "busybox:test",
                    "du",
                    "-m",
                    "/k/x"
                ]
            )
            .split_whitespace()
            .next(),
            Some("100")
        );
        rt.block_on(e.teardown(j.id())).unwrap();
    }
    let err = match rt.block_on(e.start_keyed(Some(gib(64 << 20)), &[], Some(&key))) {
        Ok(_) => panic!("a job started with a bound below its key's state"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("limits.disk_bytes") && err.contains("project cache fit"),
        "{err}"
    );
    assert!(
        jobs_left("caches-fit").is_empty(),
        "{:?}",
        jobs_left("caches-fit")
    );
}
