# The berth agent image. Build: docker build -t berth .
# Run (see README, "Running the agent in a container" for why each flag):
#   docker run -d --name berth --network host --cgroupns host \
#     --cap-add SYS_ADMIN --cap-add NET_ADMIN --cap-add SETUID --cap-add SETGID \
#     --cap-add SYS_PTRACE --cap-add KILL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#     --security-opt systempaths=unconfined \
#     -v /sys/fs/cgroup:/sys/fs/cgroup:rw -v /dev:/dev \
#     -v berth-state:/var/lib/berth -v /etc/berth:/etc/berth \
#     berth

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin berth

FROM debian:bookworm-slim
# dockerd for every job, and what the sandbox needs: iptables for
# the job's rules (its link is made over netlink), e2fsprogs and mount for each job's own disk, busybox-static
# for base images without a registry, docker-registry for the optional
# pull-through cache.
RUN apt-get update \
 && apt-get install -y --no-install-recommends docker.io iptables e2fsprogs mount busybox-static ca-certificates tar docker-registry \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/berth /usr/local/bin/berth
COPY pipelines /usr/share/berth/pipelines
# Job state (data-roots, records) and the certificates live outside the image.
VOLUME ["/var/lib/berth", "/etc/berth"]
EXPOSE 2376
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["serve", "--state-dir", "/var/lib/berth", "--certs-dir", "/etc/berth/certs"]
