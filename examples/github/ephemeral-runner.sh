#!/usr/bin/env bash
# An ephemeral GitHub Actions runner with a Docker daemon of its own: for
# workflows with `container:` jobs or `services:`, which the runner starts
# with the docker CLI. Each round gets a fresh berth job, the runner takes
# exactly one workflow job (--ephemeral), and the berth job goes with it.
#
# Needs, on the berth agent's host: the runner unpacked in $RUNNER (owned by
# the runner's user, RUNNER_USER), the berth and docker CLIs, the agent's
# admin bundle in $BERTH_CERTS_DIR/admin, and in the agent's berth.toml:
#   [workspaces] allowed_roots = ["/home/runner/actions-runner"]
# Register the runner once with `./config.sh --ephemeral …`, or pass a fresh
# registration token per round (REG_TOKEN) as below.
#
# Settings (environment): RUNNER, RUNNER_USER, BERTH_ENDPOINT and
# BERTH_CERTS_DIR as below; GITHUB_URL and REG_TOKEN, required;
# BERTH_RUNNER_ROUNDS, how many workflow jobs to take before exiting
# (default 0: one after another, forever, e.g. under a systemd service).
set -euo pipefail
RUNNER=${RUNNER:-/home/runner/actions-runner}
RUNNER_USER=${RUNNER_USER:-runner}
BERTH_ENDPOINT=${BERTH_ENDPOINT:-localhost:2376}
BERTH_CERTS_DIR=${BERTH_CERTS_DIR:-/etc/berth/certs}
BERTH_RUNNER_ROUNDS=${BERTH_RUNNER_ROUNDS:-0}
: "${GITHUB_URL:?the repository or organisation URL}" "${REG_TOKEN:?a runner registration token}"

round=0
while [ "$BERTH_RUNNER_ROUNDS" -eq 0 ] || [ "$round" -lt "$BERTH_RUNNER_ROUNDS" ]; do
    round=$((round + 1))
    bundle=$(mktemp -d)
    # A freshly unpacked runner has no _work yet (it makes it on its first
    # job), and a workspace must exist: make it as the runner's user.
    su "$RUNNER_USER" -c "mkdir -p '$RUNNER/_work'"
    # The runner's work directory (mounted at /__w in container jobs) and
    # its externals (/__e, node for JavaScript actions) at their own paths.
    # Container jobs run their steps as root: root in the job writes as the
    # runner's user (":root").
    job=$(berth job create --endpoint "$BERTH_ENDPOINT" --certs-dir "$BERTH_CERTS_DIR" \
        --ttl 6h --label github-runner="$(hostname)" \
        --workspace "$RUNNER/_work:root" --workspace "$RUNNER/externals:root" \
        --out "$bundle" --json)
    id=$(jq -r .id <<<"$job")
    chown -R "$RUNNER_USER" "$bundle"
    su "$RUNNER_USER" -c "cd '$RUNNER' && ./config.sh --unattended --ephemeral \
        --url '$GITHUB_URL' --token '$REG_TOKEN' --labels berth --replace"
    # The runner and every docker call it makes use the job's daemon.
    su "$RUNNER_USER" -c "cd '$RUNNER' && DOCKER_HOST='$(jq -r .endpoint <<<"$job")' \
        DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH='$bundle' ./run.sh" || true
    berth job rm --endpoint "$BERTH_ENDPOINT" --certs-dir "$BERTH_CERTS_DIR" "$id" || true
    rm -rf "$bundle"
done
