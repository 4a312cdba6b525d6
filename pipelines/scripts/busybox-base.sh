#!/bin/sh
# Imports a base image made from Debian's busybox-static into the daemon
# DOCKER_HOST points at: no registry needed. Usage: busybox-base.sh [NAME:TAG]
set -eu
name=${1:-hello-base:1}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  # `busybox` is in the list itself: linking it would replace the binary.
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'nobody:x:65534:65534:nobody:/:/bin/false' > "$root/etc/passwd"
tar -C "$root" -c . | docker import --change 'ENV PATH=/bin' - "$name"
