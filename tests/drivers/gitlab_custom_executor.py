#!/usr/bin/env python3
"""Drives a GitLab custom executor's executables as gitlab-runner does.

gitlab-runner cannot be installed here, so this stands in for it, following
its documented custom executor protocol: config_exec (JSON on stdout),
prepare_exec, run_exec <script> <stage> once per build stage, cleanup_exec
always. Every executable gets the job's variables as CUSTOM_ENV_*, the two
exit codes it may answer with, and runs in a temporary directory (TMPDIR)
in a process group of its own. The stage scripts are written the way the
runner's bash shell writes them: variables exported by the script itself,
commands under `set -o errexit` inside `: | eval $'...'`.

A cancel (SIGTERM or SIGINT to this process, as a job aborted in GitLab's UI)
sends SIGTERM to the running executable's process group, SIGKILL after
graceful_kill_timeout, then runs cleanup_exec.

Usage: gitlab_custom_executor.py --config config.toml --ci-file .gitlab-ci.yml
       --job NAME --repo PATH [--job-id N] [--project-path GROUP/NAME]
       [--var KEY=VALUE]... [--pause-after STAGE]

--repo is a local git repository (a path) that get_sources clones.
--var adds a project-level CI/CD variable. --pause-after STAGE prints
"paused after STAGE" and waits for a line on stdin: the time that may pass
between two stages, where a test breaks something.

The last line printed is "RESULT success|build_failure|system_failure|
canceled"; the exit code is 0, 1, 2 or 3 respectively.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

try:
    import yaml
except ImportError:  # pragma: no cover - the test asserts on this message
    sys.exit("PyYAML is missing: python3 -m pip install pyyaml (or apt-get install python3-yaml)")

BUILD_FAILURE_EXIT_CODE = 1
SYSTEM_FAILURE_EXIT_CODE = 2
# The runner's defaults for [runners.custom] timeouts, in seconds.
DEFAULT_EXEC_TIMEOUT = 3600
DEFAULT_KILL_TIMEOUT = 600

ANSI_BOLD_GREEN = "\x1b[32;1m"
ANSI_RESET = "\x1b[0;m"


class BuildFailure(Exception):
    pass


class SystemFailure(Exception):
    pass


class Canceled(Exception):
    pass


def shell_escape(value):
    """Quotes for bash as the runner does: plain when safe, else $'...'."""
    if value and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", value):
        return value
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append("\\x%02x" % code)
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def expand(value, variables):
    """$VAR and ${VAR} from the job's variables, unknown ones empty (the
    runner expands variable values so before it exports them)."""

    def repl(m):
        name = m.group(1) or m.group(2)
        return variables.get(name, "")

    return re.sub(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))", repl, value)


class BashScript:
    """One stage's script, as the runner's bash shell writer builds it."""

    def __init__(self):
        self.lines = []

    def line(self, text):
        self.lines.append(text)

    def command(self, *argv):
        self.line(" ".join(shell_escape(a) for a in argv))

    def notice(self, text):
        self.line("echo " + shell_escape(ANSI_BOLD_GREEN + text + ANSI_RESET))

    def export(self, variables):
        for key, value in variables.items():
            self.line("export %s=%s" % (shell_escape(key), shell_escape(value)))

    def user_commands(self, commands):
        for cmd in commands:
            cmd = cmd.strip()
            first = cmd.split("\n", 1)
            if len(first) > 1:
                self.notice("$ %s # collapsed multi-line command" % first[0])
            else:
                self.notice("$ %s" % cmd)
            self.line(cmd)

    def finish(self):
        body = "\n".join(self.lines) + "\n"
        return (
            "#!/usr/bin/env bash\n\n"
            "trap exit 1 TERM\n\n"
            "if set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit\n"
            "set +o noclobber\n"
            ": | eval " + shell_escape(body) + "\n"
            "exit 0\n"
        )


class Execution:
    """One executable: its stdout (captured or the job's log) and stderr
    (the job's log) pumped by threads until they close."""

    def __init__(self, argv, cwd, env, capture):
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.captured = []
        self.pumps = [
            threading.Thread(target=self.pump, args=(self.proc.stdout, capture), daemon=True),
            threading.Thread(target=self.pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self.pumps:
            t.start()

    def pump(self, pipe, capture):
        for chunk in iter(lambda: pipe.read1(65536), b""):
            if capture:
                self.captured.append(chunk)
            else:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    def wait(self, timeout):
        """True when it exited and its output closed within `timeout`."""
        deadline = time.monotonic() + timeout
        for t in self.pumps:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def returncode(self):
        return self.proc.returncode

    def stdout(self):
        return b"".join(self.captured).decode()

    def signal_group(self, sig):
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


class Runner:
    def __init__(self, args):
        with open(args.config, "rb") as f:
            config = tomllib.load(f)
        runners = config.get("runners") or []
        if not runners or runners[0].get("executor") != "custom":
            raise SystemExit("%s: the first [[runners]] must have executor = \"custom\"" % args.config)
        self.runner = runners[0]
        self.custom = self.runner.get("custom") or {}
        if not self.custom.get("run_exec"):
            raise SystemExit("%s: [runners.custom] run_exec is required" % args.config)
        self.builds_dir = self.runner.get("builds_dir", "/builds")
        self.cache_dir = self.runner.get("cache_dir", "/cache")
        self.builds_dir_is_shared = True
        self.hostname = None
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="custom-executor")
        self.proc = None
        self.canceled = threading.Event()
        with open(args.ci_file) as f:
            self.ci = yaml.safe_load(f)
        if args.job not in self.ci:
            raise SystemExit("%s: no job %r" % (args.ci_file, args.job))
        self.job = self.ci[args.job]
        self.sha = subprocess.run(
            ["git", "-C", args.repo, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.ref = subprocess.run(
            ["git", "-C", args.repo, "rev-parse", "--abbrev-ref", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.job_status = "running"

    # -- the job's definition and variables ------------------------------

    def key(self, name, default=None):
        """A job key, else `default:`'s, else the deprecated global one."""
        if name in self.job:
            return self.job[name]
        if name in (self.ci.get("default") or {}):
            return self.ci["default"][name]
        return self.ci.get(name, default)

    @staticmethod
    def as_list(value):
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        out = []
        for v in value:
            out.extend(Runner.as_list(v) if isinstance(v, list) else [str(v)])
        return out

    def project_dir(self):
        path = self.args.project_path
        if self.builds_dir_is_shared:
            return os.path.join(self.builds_dir, "0", path)
        return os.path.join(self.builds_dir, path)

    def variables(self):
        a = self.args
        namespace, _, name = a.project_path.rpartition("/")
        v = {
            "CI": "true",
            "GITLAB_CI": "true",
            "CI_SERVER": "yes",
            "CI_SERVER_HOST": "gitlab.example",
            "CI_SERVER_URL": "https://gitlab.example",
            "CI_JOB_ID": str(a.job_id),
            "CI_JOB_NAME": a.job,
            "CI_JOB_STAGE": str(self.job.get("stage", "test")),
            "CI_JOB_TOKEN": "job-token-%d" % a.job_id,
            "CI_JOB_TIMEOUT": str(a.job_timeout),
            "CI_JOB_STATUS": self.job_status,
            "CI_JOB_IMAGE": str(self.key("image", "") or ""),
            "CI_PIPELINE_ID": str(a.job_id // 10),
            "CI_PROJECT_ID": "1",
            "CI_PROJECT_PATH": a.project_path,
            "CI_PROJECT_NAMESPACE": namespace,
            "CI_PROJECT_NAME": name,
            "CI_PROJECT_DIR": self.project_dir(),
            "CI_BUILDS_DIR": self.builds_dir,
            "CI_CONCURRENT_ID": "0",
            "CI_CONCURRENT_PROJECT_ID": "0",
            "CI_RUNNER_ID": "1",
            "CI_RUNNER_SHORT_TOKEN": "berth",
            "CI_REPOSITORY_URL": a.repo,
            "CI_COMMIT_SHA": self.sha,
            "CI_COMMIT_SHORT_SHA": self.sha[:8],
            "CI_COMMIT_REF_NAME": self.ref,
            "CI_COMMIT_BRANCH": self.ref,
            "CI_DEFAULT_BRANCH": self.ref,
            "GITLAB_USER_LOGIN": "ci",
        }
        # Precedence, low to high: the file's global variables, the job's,
        # the project's CI/CD settings.
        for scope in (self.ci.get("variables") or {}, self.job.get("variables") or {}):
            for key, value in scope.items():
                if isinstance(value, dict):
                    value = value.get("value", "")
                v[key] = "" if value is None else str(value)
        for kv in a.var:
            key, _, value = kv.partition("=")
            v[key] = value
        return {k: expand(val, v) for k, val in v.items()}

    def executable_env(self):
        env = dict(os.environ)
        env["TMPDIR"] = self.tmp
        env["BUILD_FAILURE_EXIT_CODE"] = str(BUILD_FAILURE_EXIT_CODE)
        env["SYSTEM_FAILURE_EXIT_CODE"] = str(SYSTEM_FAILURE_EXIT_CODE)
        for key, value in self.variables().items():
            env["CUSTOM_ENV_" + key] = value
        services = []
        for s in self.as_list_of_services(self.key("services")):
            services.append(s)
        if services:
            env["CUSTOM_ENV_CI_JOB_SERVICES"] = json.dumps(services)
        return env

    @staticmethod
    def as_list_of_services(value):
        out = []
        for s in value or []:
            if isinstance(s, str):
                s = {"name": s}
            out.append(
                {
                    "name": s.get("name", ""),
                    "alias": s.get("alias", ""),
                    "entrypoint": s.get("entrypoint"),
                    "command": s.get("command"),
                }
            )
        return out

    # -- running the executables -----------------------------------------

    def execute(self, name, argv, timeout, capture=False):
        """Runs one executable in its own process group; returns its exit
        code and, with capture, its stdout. It has ended when it exited and
        its output closed (what it left running still writes to the job's
        log). A cancel or a timeout ends it as the runner does: SIGTERM to
        the group, SIGKILL after graceful_kill_timeout."""
        if self.canceled.is_set() and name != "cleanup_exec":
            raise Canceled()
        proc = Execution(argv, self.tmp, self.executable_env(), capture)
        self.proc = proc
        if self.canceled.is_set() and name != "cleanup_exec":
            # The cancel came while it started: end it as the handler would.
            self.kill(proc)
        try:
            if not proc.wait(timeout):
                print("%s: timed out after %ss" % (name, timeout), flush=True)
                self.kill(proc)
                raise SystemFailure("%s timed out" % name)
        finally:
            self.proc = None
        if self.canceled.is_set() and name != "cleanup_exec":
            raise Canceled()
        return proc.returncode, proc.stdout()

    def kill(self, proc):
        graceful = float(self.custom.get("graceful_kill_timeout", DEFAULT_KILL_TIMEOUT))
        force = float(self.custom.get("force_kill_timeout", DEFAULT_KILL_TIMEOUT))
        proc.signal_group(signal.SIGTERM)
        if proc.wait(graceful):
            return
        proc.signal_group(signal.SIGKILL)
        if not proc.wait(force):
            print("failed to kill process PID=%d, likely process is dormant" % proc.pid, flush=True)

    def cancel(self, signum, _frame):
        if self.canceled.is_set():
            return
        print("\nERROR: Job canceled (signal %d)" % signum, flush=True)
        self.canceled.set()
        # A signal handler runs between two steps of the main thread: the
        # kill and its grace period go to a thread of their own.
        proc = self.proc
        if proc is not None:
            threading.Thread(target=self.kill, args=(proc,), daemon=True).start()

    def check(self, name, code):
        """The runner's reading of an executable's exit code."""
        if code == 0:
            return
        if code == BUILD_FAILURE_EXIT_CODE:
            raise BuildFailure("%s: exit status %d" % (name, code))
        if code == SYSTEM_FAILURE_EXIT_CODE:
            raise SystemFailure("%s: exit status %d" % (name, code))
        raise SystemFailure("%s: unknown Custom executor executable exit code %d" % (name, code))

    def timeout_of(self, key):
        return float(self.custom.get(key, DEFAULT_EXEC_TIMEOUT))

    def config_exec(self):
        exe = self.custom.get("config_exec")
        if not exe:
            return
        code, out = self.execute(
            "config_exec", [exe, *self.custom.get("config_args", [])], self.timeout_of("config_exec_timeout"), True
        )
        self.check("config_exec", code)
        if not out.strip():
            return
        try:
            cfg = json.loads(out)
        except json.JSONDecodeError as e:
            raise SystemFailure("error while parsing JSON output: %s" % e)
        self.hostname = cfg.get("hostname", self.hostname)
        self.builds_dir = cfg.get("builds_dir", self.builds_dir)
        self.cache_dir = cfg.get("cache_dir", self.cache_dir)
        self.builds_dir_is_shared = cfg.get("builds_dir_is_shared", self.builds_dir_is_shared)
        driver = cfg.get("driver") or {}
        line = "Using Custom executor"
        if driver.get("name"):
            line += " with driver " + driver["name"]
            if driver.get("version"):
                line += " " + driver["version"]
        print(line + "...", flush=True)

    def prepare_exec(self):
        exe = self.custom.get("prepare_exec")
        if not exe:
            return
        code, _ = self.execute(
            "prepare_exec", [exe, *self.custom.get("prepare_args", [])], self.timeout_of("prepare_exec_timeout")
        )
        self.check("prepare_exec", code)

    def run_stage(self, stage, script):
        if self.canceled.is_set():
            raise Canceled()
        sdir = tempfile.mkdtemp(prefix="script", dir=self.tmp)
        path = os.path.join(sdir, "script.sh")
        with open(path, "w") as f:
            f.write(script.finish())
        os.chmod(path, 0o700)
        print(
            "section_start:%s:%s\r\x1b[0K%sExecuting \"%s\" stage of the job script%s"
            % (int(time.time()), stage, ANSI_BOLD_GREEN, stage, ANSI_RESET),
            flush=True,
        )
        code, _ = self.execute(
            stage, [self.custom["run_exec"], *self.custom.get("run_args", []), path, stage], self.args.job_timeout
        )
        self.check(stage, code)

    def cleanup_exec(self):
        exe = self.custom.get("cleanup_exec")
        if not exe:
            return
        try:
            code, _ = self.execute(
                "cleanup_exec", [exe, *self.custom.get("cleanup_args", [])], self.timeout_of("cleanup_exec_timeout")
            )
        except SystemFailure as e:
            print("WARNING: Cleanup script failed: %s" % e, flush=True)
            return
        if code != 0:
            print("WARNING: Cleanup script failed: exit status %d" % code, flush=True)

    # -- the stages' scripts ---------------------------------------------

    def exports(self, s):
        s.export(self.variables())

    def stage_script(self, stage):
        s = BashScript()
        v = self.variables()
        project_dir = v["CI_PROJECT_DIR"]
        if stage == "prepare_script":
            if self.hostname:
                s.line('echo "Running on $(hostname) via %s..."' % self.hostname)
            else:
                s.line('echo "Running on $(hostname)..."')
            return s
        self.exports(s)
        if stage == "get_sources":
            s.notice("Fetching changes...")
            s.command("rm", "-r", "-f", project_dir)
            s.notice("Cloning repository...")
            s.command("git", "clone", "--no-checkout", self.args.repo, project_dir)
            s.command("cd", project_dir)
            s.notice("Checking out %s as %s..." % (self.sha[:8], self.ref))
            s.command("git", "checkout", "-f", "-q", self.sha)
            return s
        if stage == "cleanup_file_variables":
            return s
        s.command("cd", project_dir)
        if stage == "step_script":
            s.user_commands(self.as_list(self.key("before_script")) + self.as_list(self.job.get("script")))
        elif stage == "after_script":
            s.notice("Running after script...")
            s.user_commands(self.as_list(self.key("after_script")))
        return s

    def has_after_script(self):
        return bool(self.as_list(self.key("after_script")))

    # -- the job ---------------------------------------------------------

    def run(self):
        result = "success"
        reason = ""
        try:
            self.config_exec()
            self.prepare_exec()
            self.pause("prepare_exec")
            for stage in ("prepare_script", "get_sources", "restore_cache", "download_artifacts"):
                self.run_stage(stage, self.stage_script(stage))
                self.pause(stage)
            try:
                self.run_stage("step_script", self.stage_script("step_script"))
                self.job_status = "success"
                self.pause("step_script")
            except BuildFailure as e:
                result, reason = "build_failure", str(e)
                self.job_status = "failed"
            if self.has_after_script():
                try:
                    self.run_stage("after_script", self.stage_script("after_script"))
                except BuildFailure as e:
                    print("WARNING: after_script failed: %s" % e, flush=True)
            ok = result == "success"
            for stage in (
                "archive_cache" if ok else "archive_cache_on_failure",
                "upload_artifacts_on_success" if ok else "upload_artifacts_on_failure",
                "cleanup_file_variables",
            ):
                self.run_stage(stage, self.stage_script(stage))
        except BuildFailure as e:
            result, reason = "build_failure", str(e)
        except SystemFailure as e:
            result, reason = "system_failure", str(e)
        except Canceled:
            result, reason = "canceled", "canceled"
        finally:
            self.cleanup_exec()
        if result == "canceled" or self.canceled.is_set():
            result = "canceled"
            print("ERROR: Job failed: canceled", flush=True)
        elif result == "success":
            print("Job succeeded", flush=True)
        elif result == "build_failure":
            print("ERROR: Job failed: %s" % reason, flush=True)
        else:
            print("ERROR: Job failed (system failure): %s" % reason, flush=True)
        print("RESULT " + result, flush=True)
        return {"success": 0, "build_failure": 1, "system_failure": 2, "canceled": 3}[result]

    def pause(self, after):
        if self.args.pause_after == after:
            print("paused after " + after, flush=True)
            sys.stdin.readline()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config.toml with a [[runners]] of executor \"custom\"")
    p.add_argument("--ci-file", required=True, help=".gitlab-ci.yml")
    p.add_argument("--job", required=True, help="the job of the file to run")
    p.add_argument("--repo", required=True, help="a local git repository (a path) to clone")
    p.add_argument("--job-id", type=int, default=1000)
    p.add_argument("--job-timeout", type=int, default=3600)
    p.add_argument("--project-path", default="group/project")
    p.add_argument("--var", action="append", default=[], help="a project CI/CD variable, KEY=VALUE")
    p.add_argument("--pause-after", default=None)
    args = p.parse_args()
    runner = Runner(args)
    signal.signal(signal.SIGTERM, runner.cancel)
    signal.signal(signal.SIGINT, runner.cancel)
    sys.exit(runner.run())


if __name__ == "__main__":
    main()
