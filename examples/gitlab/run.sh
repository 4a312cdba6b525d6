#!/bin/sh
# Custom executor run stage: the job's script with docker:dind's variables.
set -eu
dir="/run/berth-ci/$CUSTOM_ENV_CI_JOB_ID"
endpoint=$(sed -n 's/.*"endpoint":"\([^"]*\)".*/\1/p' "$dir/job.json")
DOCKER_HOST="$endpoint" DOCKER_TLS_VERIFY=1 DOCKER_TLS_CERTDIR="$dir/certs" \
DOCKER_CERT_PATH="$dir/certs/client" exec bash "$1"
