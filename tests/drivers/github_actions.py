#!/usr/bin/env python3
"""Runs one job of a GitHub Actions workflow file the way a self-hosted
runner runs its `run:` steps, for tests: each step a fresh `bash -e FILE` in
the workspace, `${{ github.sha }}` substituted, the KEY=VALUE lines a step
appends to $GITHUB_ENV in the environment of the steps after it, steps after
a failure skipped unless `if: always()`. `actions/checkout` stands for the
checkout the caller made in --workspace; anything the driver cannot run as
the runner would (another action, another expression) is an error, so a
changed workflow fails loudly instead of being half run.

Prints `STEP <n> <name>: <exit code|skipped>` per step and ends with
`RESULT success` or `RESULT failure` (exit 0 or 1); 2 for a workflow it
cannot run.
"""

import argparse
import os
import re
import subprocess
import sys
import uuid

import yaml

EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def die(msg):
    print(f"driver: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def substitute(text, context):
    def one(m):
        if m.group(1) not in context:
            die(f"unsupported expression ${{{{ {m.group(1)} }}}}")
        return context[m.group(1)]

    return EXPR.sub(one, text)


def read_env_file(path):
    """KEY=VALUE lines and KEY<<DELIM blocks, as the runner reads them."""
    out = {}
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        return out
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delim = line.split("<<", 1)
            value = []
            while i < len(lines) and lines[i] != delim:
                value.append(lines[i])
                i += 1
            if i == len(lines):
                die(f"{path}: no closing {delim} for {key}")
            i += 1
            out[key] = "\n".join(value)
        elif "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
        else:
            die(f"{path}: bad line {line!r}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workflow", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--workspace", required=True, help="the checkout")
    ap.add_argument("--runner-temp", required=True)
    ap.add_argument("--sha", required=True)
    ap.add_argument("--user", help="UID:GID the steps run as (the runner's user)")
    args = ap.parse_args()

    with open(args.workflow, encoding="utf-8") as f:
        wf = yaml.safe_load(f)
    job = wf.get("jobs", {}).get(args.job)
    if job is None:
        die(f"no job {args.job} in {args.workflow}")
    for key in ("container", "services", "strategy", "defaults"):
        if key in job:
            die(f"job {args.job}: `{key}` is not supported")
    context = {"github.sha": args.sha}
    env = dict(os.environ)
    env.update(
        {
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_SHA": args.sha,
            "GITHUB_JOB": args.job,
            "GITHUB_WORKSPACE": args.workspace,
            "RUNNER_TEMP": args.runner_temp,
        }
    )
    for scope in (wf, job):
        for k, v in (scope.get("env") or {}).items():
            env[k] = substitute(str(v), context)
    user = group = None
    if args.user:
        user, group = (int(x) for x in args.user.split(":"))

    failed = False
    for n, step in enumerate(job.get("steps", []), 1):
        name = step.get("name") or step.get("uses") or step.get("run", "").splitlines()[0]
        cond = step.get("if")
        if cond not in (None, "always()", "${{ always() }}"):
            die(f"step {n}: unsupported if: {cond}")
        if failed and cond is None:
            print(f"STEP {n} {name}: skipped", flush=True)
            continue
        if "uses" in step:
            if not step["uses"].startswith("actions/checkout@"):
                die(f"step {n}: unsupported action {step['uses']}")
            print(f"STEP {n} {name}: 0 (the caller's checkout)", flush=True)
            continue
        if "shell" in step:
            die(f"step {n}: unsupported shell {step['shell']}")
        script = substitute(step["run"], context)
        step_env = dict(env)
        for k, v in (step.get("env") or {}).items():
            step_env[k] = substitute(str(v), context)
        # A fresh file per step, as the runner makes one.
        env_file = os.path.join(args.runner_temp, f"_runner_file_commands/set_env_{uuid.uuid4()}")
        os.makedirs(os.path.dirname(env_file), exist_ok=True)
        open(env_file, "w").close()
        path = os.path.join(args.runner_temp, f"{uuid.uuid4()}.sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        if user is not None:
            os.chown(env_file, user, group)
            os.chown(path, user, group)
        step_env["GITHUB_ENV"] = env_file
        print(f"::group::{name}", flush=True)
        code = subprocess.run(
            ["bash", "-e", path],
            cwd=args.workspace,
            env=step_env,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        ).returncode
        print(f"STEP {n} {name}: {code}", flush=True)
        env.update(read_env_file(env_file))
        if code != 0:
            failed = True
    print("RESULT failure" if failed else "RESULT success", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
