#!/bin/sh
# Custom executor cleanup stage: the daemon and everything in it go.
dir="/run/berth-ci/$CUSTOM_ENV_CI_JOB_ID"
id=$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' "$dir/job.json" 2>/dev/null)
[ -n "$id" ] && berth job rm --endpoint "${BERTH_ENDPOINT:-localhost:2376}" --certs-dir /etc/berth/certs "$id"
rm -rf "$dir"
