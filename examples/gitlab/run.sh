#!/bin/sh
# run_exec: run.sh <script> <stage>. Runs one stage's script (written by
# the runner: it exports the job's variables itself) where `docker`
# resolves to the berth agent and $DOCKER_TLS_CERTDIR holds this CI job's
# bundle. Both exist only in a private mount namespace per stage, so CI jobs
# side by side on one runner never see each other's certificates.
set -u
script=$1 stage=$2
. "$(dirname "$0")/common.sh"
id=$(cat "$job_dir/id" 2>/dev/null) || system_failure "no berth job for CI job $CUSTOM_ENV_CI_JOB_ID (prepare_exec did not run?)"

# A daemon that is gone is berth's failure, not the build's: say so before
# the stage's docker calls fail on it.
jobs=$(berth job ls --json --endpoint "$BERTH_ENDPOINT" --certs-dir "$BERTH_CERTS_DIR") ||
    system_failure "the berth agent at $BERTH_ENDPOINT does not answer ($stage)"
printf '%s' "$jobs" | jq -e --arg id "$id" 'any(.[]; .id == $id and .status == "running")' >/dev/null ||
    system_failure "berth job $id is gone or not running ($stage)"

# What a docker:dind pipeline may leave unset; the script's own exports of
# the job's variables come later and win.
export DOCKER_HOST=tcp://docker:2376 DOCKER_TLS_VERIFY=1 \
    DOCKER_TLS_CERTDIR="$certdir" DOCKER_CERT_PATH="$certdir/client"

# The namespace is ready when the mounts are: fd 3 says so, and is closed
# before the script starts, so a failing script never reads as our failure.
ready=$job_dir/ready.$$
unshare --mount --propagation private -- sh -c '
    mount --bind "$1/certs" "$2" &&
    mount --bind "$1/hosts" /etc/hosts &&
    mount -t tmpfs -o mode=0755,size=16k berth-ci "$3" &&
    echo ready >&3 && exec bash "$4" 3>&-
' run.sh "$job_dir" "$certdir" "$BERTH_CI_DIR" "$script" 3>"$ready"
rc=$?
# The tmpfs over $BERTH_CI_DIR hides every CI job's bundle, this one's too:
# only $DOCKER_TLS_CERTDIR shows it.
grep -q ready "$ready" 2>/dev/null || { rm -f "$ready"; system_failure "cannot prepare the mount namespace for $stage"; }
rm -f "$ready"
[ "$rc" -eq 0 ] || exit "${BUILD_FAILURE_EXIT_CODE:-1}"
