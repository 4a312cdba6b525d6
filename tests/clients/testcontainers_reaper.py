"""Testcontainers for Python with its defaults (Ryuk on) against a berth
job, as a CI job's test run uses it: only DOCKER_HOST, DOCKER_TLS_VERIFY and
DOCKER_CERT_PATH are set. Starts a container, reports it and the reaper,
then waits to be killed, as a crashed test run is.

    testcontainers_reaper.py --reaper-image   the reaper image it asks for
    testcontainers_reaper.py IMAGE            the run
"""

import sys
import time

from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer, Reaper

if sys.argv[1] == "--reaper-image":
    print(testcontainers_config.ryuk_image)
    sys.exit(0)

container = DockerContainer(sys.argv[1]).with_command(["sleep", "3600"])
container.start()
reaper = Reaper._container.get_wrapped_container().id
print(f"container={container.get_wrapped_container().id} reaper={reaper}", flush=True)
time.sleep(3600)
