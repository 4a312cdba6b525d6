"""Testcontainers with its defaults against a berth job: the container's
exposed port must answer at get_container_host_ip():get_exposed_port().
Only DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH are set, and Ryuk
is off: this run is about ports (tests/inside.rs runs Testcontainers with
Ryuk on, against a stand-in for its image)."""

import socket
import sys
import time

from testcontainers.core.container import DockerContainer

REPLY = b"hello-from-testcontainers"

container = (
    DockerContainer(sys.argv[1])
    .with_exposed_ports(8080)
    .with_command(
        ["sh", "-c", "while true; do echo %s | nc -l -p 8080; done" % REPLY.decode()]
    )
)
with container:
    host = container.get_container_host_ip()
    port = int(container.get_exposed_port(8080))
    got, last = b"", None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(5)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
            if REPLY in got:
                break
        except OSError as e:
            last = e
        time.sleep(0.1)
    print(f"host={host} port={port} got={got!r} last_error={last!r}")
    sys.exit(0 if REPLY in got else 1)
