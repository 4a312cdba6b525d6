# The berth agent image, built with no registry:
#   scripts/image/build-base                  # berth-base:bookworm, from Debian's packages (debootstrap)
#   cargo build --release --locked --bin berth
#   docker build -t berth .
# The berth binary is the one built on the host (Debian 12: the base's glibc).
#
# Run (scripts/test-image runs the image with exactly these flags; README,
# "Running the agent in a container", shows the same and says what each is
# for and what failed without it):
#   docker run -d --name berth --network host --cgroupns host --stop-timeout 60 \
#     --cap-drop ALL --cap-add SYS_ADMIN --cap-add NET_ADMIN --cap-add SETUID --cap-add SETGID \
#     --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER --cap-add KILL --cap-add NET_BIND_SERVICE \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#     --security-opt systempaths=unconfined \
#     --mount type=bind,source=/sys,target=/sys,bind-nonrecursive=true \
#     -v /sys/fs/cgroup:/sys/fs/cgroup -v /dev:/dev \
#     --device-cgroup-rule 'b 7:* rwm' --device-cgroup-rule 'c 10:237 rwm' \
#     -v berth-state:/var/lib/berth -v /etc/berth:/etc/berth \
#     berth
#
# Not --privileged. The agent needs these; no job gets them (each job is root
# only in a user namespace of its own). -e BERTH_CONFIG=/etc/berth/berth.toml
# gives it a configuration; a second agent on the host needs its own
# uid_base, net_pool, port_pool and cgroup_parent there.

ARG BASE=berth-base:bookworm
FROM ${BASE}
# The release profile keeps debug info (100 MB); scripts/test-image passes a
# copy without it (objcopy --strip-debug, 17 MB) as BERTH_BIN.
ARG BERTH_BIN=target/release/berth
COPY ${BERTH_BIN} /usr/local/bin/berth
COPY pipelines /usr/share/berth/pipelines
# Job state (data-roots, records) and the certificates live outside the image.
VOLUME ["/var/lib/berth", "/etc/berth"]
EXPOSE 2376
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["serve", "--state-dir", "/var/lib/berth", "--certs-dir", "/etc/berth/certs"]
