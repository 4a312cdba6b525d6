#!/bin/sh
# cleanup_exec: runs after every CI job, also a failed or canceled one. The
# berth job goes (its daemon, containers, images), and so do this CI job's
# bundle and builds directory. The runner only logs what this exits with.
set -u
. "$(dirname "$0")/common.sh"
rc=0
if id=$(cat "$job_dir/id" 2>/dev/null); then
    berth job rm --endpoint "$BERTH_ENDPOINT" --certs-dir "$BERTH_CERTS_DIR" "$id" >/dev/null ||
        { echo "berth: cannot remove job $id now; the agent ends it when its ttl runs out" >&2; rc=1; }
fi
rm -rf "$job_dir" "$BERTH_BUILDS_DIR/$CUSTOM_ENV_CI_JOB_ID"
exit "$rc"
