#!/bin/sh
# prepare_exec: one berth job per CI job. Its client bundle lands in the
# docker:dind layout (client/{ca,cert,key}.pem), and a hosts file names the
# agent `docker`; run.sh shows both to each stage, and only to it.
set -u
here=$(dirname "$0")
. "$here/common.sh"
for tool in berth jq unshare mount getent; do
    command -v "$tool" >/dev/null ||
        system_failure "$tool is missing on the runner host (jq: apt-get install jq; unshare, mount: util-linux)"
done
# The runner retries a prepare that failed on our side: start from nothing.
[ -e "$job_dir" ] && "$here/cleanup.sh"
mkdir -p "$job_dir" && chmod 0700 "$job_dir" || system_failure "cannot create $job_dir"
# The mount point for the bundle: /certs does not exist on a runner host.
# It stays empty there; run.sh binds this CI job's bundle over it.
mkdir -p "$certdir" || system_failure "cannot create the mount point $certdir"

# The daemon lives as long as the CI job may, plus time for cleanup.
ttl=${BERTH_TTL:-$((${CUSTOM_ENV_CI_JOB_TIMEOUT:-3600} + 600))s}
json=$(berth job create --endpoint "$BERTH_ENDPOINT" --certs-dir "$BERTH_CERTS_DIR" --ttl "$ttl" \
    --label "gitlab-project=${CUSTOM_ENV_CI_PROJECT_PATH:-}" --label "gitlab-job=$CUSTOM_ENV_CI_JOB_ID" \
    --out "$job_dir/certs/client" --json) ||
    system_failure "cannot create a berth job at $BERTH_ENDPOINT"
printf '%s\n' "$json" | jq -er .id >"$job_dir/id" || system_failure "berth job create printed no id: $json"

# `docker` is the agent, as the runner host reaches it (BERTH_DOCKER_ADDR
# when that differs, e.g. behind a proxy); the agent's certificate names
# `docker` as docker:dind's does. First in the file, so it wins.
addr=${BERTH_DOCKER_ADDR:-$(getent ahostsv4 "${BERTH_ENDPOINT%:*}" | awk 'NR == 1 { print $1 }')}
[ -n "$addr" ] || system_failure "cannot resolve the agent's host ${BERTH_ENDPOINT%:*}"
{ printf '%s\tdocker\n' "$addr" && cat /etc/hosts; } >"$job_dir/hosts" ||
    system_failure "cannot write $job_dir/hosts"
echo "berth job $(cat "$job_dir/id") stands in for docker:dind at docker:2376 ($addr)"
