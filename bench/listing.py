"""Where a resync's container listing goes (issue 16), natively on any host:

    taskset -c 1 .venv/bin/python -m bench.listing [SERVICES] [SERVERS] [RUNS]

The stand-in Docker engine of bench/stand_in_dockerd.py (a process of its
own) serves SERVICES x SERVERS labelled containers (default 1000 x 10).
Timed RUNS times each (default 7), wall clock, after one untimed listing:
- ``adapter_listing``: ``DockerSource.list_containers()`` as a resync calls
  it (the SDK's request and JSON decoding, then the adapter's records,
  reused when an entry is unchanged);
- ``http_only``: the same request through the SDK's session, the body read,
  not decoded;
- ``json_decode``: ``json.loads`` of that body alone.
The rest of the adapter's figure is the SDK's text decoding and the
adapter's own walk. Writes bench/results/listing-<time>.json (``where``:
host). A measurement, not a test.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from bench.cold_sync import StandIn
from bench.results_file import save
from dockerlb.adapters.docker_source import DockerSource
from dockerlb.settings import Settings


def timed(fn, runs: int) -> dict:
    ms = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - start) * 1000)
    return {
        "n": runs,
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
    }


def main() -> None:
    services = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    servers = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    path = os.path.join(tempfile.mkdtemp(prefix="dlb-listing-"), "docker.sock")
    stand_in = StandIn(path, services, servers)
    os.environ["DOCKER_HOST"] = f"unix://{path}"
    source = DockerSource(Settings())
    api = source._client.api  # the SDK's session, for the request alone
    url = f"{api.base_url}/v{api.api_version}/containers/json"
    params = {"filters": json.dumps({"status": ["running", "paused"]})}
    try:
        assert len(source.list_containers()) == services * servers
        body = api.get(url, params=params).content
        results = {
            "containers": services * servers,
            "body_bytes": len(body),
            "adapter_listing": timed(source.list_containers, runs),
            "http_only": timed(lambda: api.get(url, params=params).content, runs),
            "json_decode": timed(lambda: json.loads(body), runs),
        }
    finally:
        source.close()
        stand_in.close()
    save("listing", results)


if __name__ == "__main__":
    main()
