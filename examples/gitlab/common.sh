# Sourced by every stage of the custom executor: where berth and this CI
# job's files are, and how a failure on berth's side reaches the runner.
# Settings come from gitlab-runner's own environment (its service unit).
BERTH_ENDPOINT=${BERTH_ENDPOINT:-localhost:2376}
BERTH_CERTS_DIR=${BERTH_CERTS_DIR:-/etc/berth/certs}
BERTH_CI_DIR=${BERTH_CI_DIR:-/run/berth-ci}
BERTH_BUILDS_DIR=${BERTH_BUILDS_DIR:-/var/lib/berth-ci/builds}
BERTH_CACHE_DIR=${BERTH_CACHE_DIR:-/var/lib/berth-ci/cache}

# The runner tells the two exit codes it understands; anything else it takes
# for a broken executor. A build failure is the user's script failing; a
# system failure is ours (agent unreachable, job gone, create refused), and
# the runner may retry the job elsewhere.
system_failure() {
    echo "berth: $*" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
}

[ -n "${CUSTOM_ENV_CI_JOB_ID:-}" ] || system_failure "CUSTOM_ENV_CI_JOB_ID is not set: run by gitlab-runner's custom executor"
# A CI job id is unique on its GitLab instance: one directory per CI job.
job_dir=$BERTH_CI_DIR/$CUSTOM_ENV_CI_JOB_ID
# docker:dind's contract: the client bundle in $DOCKER_TLS_CERTDIR/client.
# berth always speaks TLS, so an empty DOCKER_TLS_CERTDIR means the default.
certdir=${CUSTOM_ENV_DOCKER_TLS_CERTDIR:-/certs}
