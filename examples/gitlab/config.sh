#!/bin/sh
# config_exec: names the driver and gives each CI job a builds directory of
# its own (removed by cleanup.sh), as fresh as the berth job beside it.
set -u
. "$(dirname "$0")/common.sh"
command -v jq >/dev/null || system_failure "jq is missing on the runner host: apt-get install jq"
jq -n \
    --arg version "$(berth --version 2>/dev/null | cut -d' ' -f2)" \
    --arg builds "$BERTH_BUILDS_DIR/$CUSTOM_ENV_CI_JOB_ID" \
    --arg cache "$BERTH_CACHE_DIR" \
    --arg host "$(hostname)" \
    '{driver: {name: "berth", version: $version}, hostname: $host,
      builds_dir: $builds, cache_dir: $cache, builds_dir_is_shared: false}'
