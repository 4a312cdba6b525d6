#!/bin/sh
# Custom executor prepare stage: one berth job per CI job, its client bundle in
# the docker:dind layout ($DOCKER_TLS_CERTDIR/client).
set -eu
dir="/run/berth-ci/$CUSTOM_ENV_CI_JOB_ID"
mkdir -p "$dir/certs"
berth job create --endpoint "${BERTH_ENDPOINT:-localhost:2376}" --certs-dir /etc/berth/certs \
  --ttl "${BERTH_TTL:-2h}" --label "gitlab=$CUSTOM_ENV_CI_PROJECT_PATH#$CUSTOM_ENV_CI_JOB_ID" \
  --out "$dir/certs/client" --json > "$dir/job.json"
