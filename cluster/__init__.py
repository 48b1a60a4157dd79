"""Config loading, topology, local Kafka and Ray, the CLI and benchmarks."""

import os

# Must be set before `ray` is first imported (ray_constants reads it at import): without it a
# driver resolves a head on 127.0.0.1 to the machine's external IP and hangs connecting to it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
