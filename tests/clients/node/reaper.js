// Testcontainers for Node with its defaults (Ryuk on) against a berth job,
// as a CI job's test run uses it: only DOCKER_HOST, DOCKER_TLS_VERIFY and
// DOCKER_CERT_PATH are set. Starts a container, reports it, then waits to
// be killed, as a crashed test run is.
//
//   node reaper.js --reaper-image   the reaper image it asks for
//   node reaper.js IMAGE            the run
"use strict";
const { GenericContainer } = require("testcontainers");
const { REAPER_IMAGE } = require("testcontainers/build/reaper/reaper");

if (process.argv[2] === "--reaper-image") {
  console.log(REAPER_IMAGE);
  process.exit(0);
}

(async () => {
  const container = await new GenericContainer(process.argv[2])
    .withCommand(["sleep", "3600"])
    .start();
  console.log(`container=${container.getId()}`);
  setInterval(() => {}, 1 << 30);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
