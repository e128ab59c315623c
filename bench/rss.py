"""The controller's memory at 10,000 real servers (issue 16), natively on any host:

    taskset -c 1 nice -n 19 .venv/bin/python -m bench.rss [SERVICES] [SERVERS] [RUNS] [--against TREE]

Each run is a fresh process (RUNS, default 5, of them) that:
1. imports what ``dockerlb run`` imports: ``dockerlb.app.cli`` and every module
   behind the objects ``run`` builds (the Docker, IPVS, director, health,
   metrics and real-server adapters), whether cli.py imports them at its
   top or on first use;
2. builds SERVICES x SERVERS (default 1000 x 10) containers as the Docker
   adapter does at start-up: each container's inspect JSON, as
   bench/stand_in_dockerd.py answers it (a compose service's ~10 labels and
   dockerlb's two), encoded and decoded again (so no string is shared
   between containers, as none is when 10,000 answers are decoded) and
   parsed by ``docker_source.container_from_inspect``;
3. constructs the real ``dockerlb.app.controller.Controller`` over the in-memory
   ports of harness/memory_ports.py holding them, and runs a full pass,
   ``reconcile(None)``, twice (the first creates the 1,000 VIPs, 1,000
   services and 10,000 real servers, checked; the second finds nothing to
   do). The second pass lists new records of the same containers, decoded
   again, as the Docker adapter gives a periodic resync: what the
   controller keeps of the old ones is in its figures.
It reports VmRSS, VmHWM, RssAnon and RssFile (/proc/self/status, KiB) at
the interpreter's start, after the imports, after the containers exist,
after the first pass and after both, and the passes' wall time (the
second's includes decoding the new records, as a real resync's does). The
garbage collector runs as it does in the controller; nothing is collected
or freed by hand.

One more run, not in those figures, traces allocations (tracemalloc, from
after the imports) and reports the 20 places holding the most of what the
containers and passes retain, each named by the innermost line of this
project's code that allocated it (and the line that really did, when that
is elsewhere), and how much of it the in-memory ports hold themselves
(their IPVS table and container dict stand for the kernel's and dockerd's
memory: not the controller's in production).

What this does not have of ``dockerlb run``: no Docker client, netlink
socket, HTTP response or netlink dump (the ports are stand-ins), so neither
their buffers nor the peak of decoding 10,000 HTTP answers is here: after
the passes, VmHWM is the peak of building the containers one at a time and
of the passes, not of a real start-up (bench/cold_sync.py measures that in
the IPVS guest).

``--against TREE`` runs the same in another checkout (e.g. a ``git
worktree`` at the commit before a change), this harness importing that
tree's dockerlb, bench and tests, the runs of the two alternating: a
before/after of the same moment, side by side; ``--this TREE`` measures
another checkout in this one's place (the harness stays this one: a
change measured with the harness as it is now). Writes bench/results/rss-<time>.json:
for each tree, every run's figures and each figure's median, min and max
(DOCKERLB_BENCH_LABEL kept as ``label``). These are measurements, not
tests: nothing here fails on a large figure.
"""

from __future__ import annotations

import json
import os
import sys

# The interpreter as started (json is all this has imported yet).
with open("/proc/self/status") as _f:
    START_STATUS = _f.read()

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = 20
# RssAnon is the process's own memory; RssFile its mapped files' pages
# (shared libraries' code, shared with other processes): VmRSS is the two
# (and RssShmem, none here).
FIGURES = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status(text: str | None = None) -> dict[str, int]:
    """FIGURES (KiB) from /proc/self/status (or a copy of it)."""
    if text is None:
        with open("/proc/self/status") as f:
            text = f.read()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in FIGURES:
            found[name] = int(value.split()[0])
    return found


# -- one run, in a fresh process ----------------------------------------------------------


def child(tree: str, services: int, servers: int, trace: bool) -> dict:
    sys.path[0] = tree  # that tree's dockerlb, bench and tests
    import time

    at = {"start": status(START_STATUS)}

    # What `dockerlb run` imports: cli.py, and the modules of everything
    # run() and _open() build (imported here in case cli.py defers them).
    import dockerlb.adapters.director
    import dockerlb.adapters.docker_source
    import dockerlb.adapters.health
    import dockerlb.adapters.ipvs
    import dockerlb.adapters.metrics
    import dockerlb.adapters.realserver
    import dockerlb.app.cli
    import dockerlb.app.server_prep  # noqa: F401

    at["imports"] = status()
    modules = len(sys.modules)

    from datetime import UTC, datetime

    from bench import stand_in_dockerd as stand_in
    from dockerlb.adapters.docker_source import container_from_inspect, network_from_summary
    from dockerlb.app.controller import Controller
    from dockerlb.settings import Settings

    ports = memory_ports_of_the_tree()
    MemoryDirector, MemoryDocker, MemoryIpvs = ports.MemoryDirector, ports.MemoryDocker, ports.MemoryIpvs

    if trace:
        import tracemalloc

        tracemalloc.start(8)
    at["harness_imported"] = status()

    from loguru import logger

    logger.remove()  # a line per operation: not what is measured

    base = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    n = services * servers

    def inspected() -> list:
        """Every container as the Docker adapter makes it from dockerd's answer."""
        containers = []
        for serial in range(n):
            inspect, _ = stand_in.container(serial, servers, base)
            containers.append(container_from_inspect(json.loads(json.dumps(inspect))))
        return containers

    class Relisting(MemoryDocker):
        """Lists new records every time after the first, as the Docker
        adapter does (a full pass asks dockerd again and decodes its answers):
        what a resync leaves in memory, not only what the start-up did."""

        listed = False

        def list_containers(self, detailed=None) -> list:
            if self.listed:
                for c in inspected():
                    self.start(c)
            self.listed = True
            return super().list_containers(detailed)

    networks = [network_from_summary(json.loads(json.dumps(net))) for net in stand_in.NETWORKS]
    docker = Relisting(inspected(), networks)
    at["containers"] = status()

    ipvs, director = MemoryIpvs(), MemoryDirector()
    controller = Controller(Settings(), docker, ipvs, director)
    pass_s = []
    # VIPs, services and servers; then nothing.
    for phase, expected in (("first_pass", services * 2 + n), ("passes", 0)):
        t = time.perf_counter()
        outcome = controller.reconcile(None)
        pass_s.append(round(time.perf_counter() - t, 3))
        assert outcome.failed == 0 and len(outcome.ops) == expected, (outcome.failed, len(outcome.ops))
        at[phase] = status()
    assert ipvs.servers() == n, f"{ipvs.servers()} real servers in the table, not {n}"

    run = {"at": at, "modules_after_imports": modules, "pass_s": pass_s}
    if trace:
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        run["trace"] = retained(snapshot, tree)
    return run


def memory_ports_of_the_tree():
    """The measured tree's in-memory ports: harness/memory_ports.py, or
    tests/memory_ports.py in a tree from before the harness package (this
    benchmark measures older commits beside this one)."""
    import importlib

    try:
        return importlib.import_module("harness.memory_ports")
    except ModuleNotFoundError:
        return importlib.import_module("tests.memory_ports")


def retained(snapshot, tree: str) -> dict:
    """What tracemalloc saw retained, by the project line that allocated it."""
    import inspect

    memory_ports = memory_ports_of_the_tree()

    ports = [
        (memory_ports.__file__, *span(inspect.getsourcelines(fn)))
        for fn in (memory_ports.MemoryIpvs._write_one, memory_ports.MemoryDocker.__init__)
    ]
    # This project's code, by preference: the controller's, then the stand-ins',
    # then this harness (which may be another tree's).
    ours = [os.path.join(tree, d) + os.sep for d in ("dockerlb", "harness", "tests", "bench")]
    ours.append(os.path.abspath(__file__))
    places: dict[str, list[int]] = {}
    total = held_by_ports = 0
    for stat in snapshot.statistics("traceback"):
        frames = list(reversed(stat.traceback))  # innermost first
        total += stat.size
        if any(f.filename == p and lo <= f.lineno <= hi for f in frames for p, lo, hi in ports):
            held_by_ports += stat.size
        own = next((f for d in ours for f in frames if f.filename.startswith(d)), frames[0])
        name = f"{short(own.filename, tree)}:{own.lineno}"
        if own is not frames[0]:
            name += f" (in {short(frames[0].filename, tree)}:{frames[0].lineno})"
        place = places.setdefault(name, [0, 0])
        place[0] += stat.size
        place[1] += stat.count
    top = sorted(places.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "traced_kib": round(total / 1024),
        "held_by_memory_ports_kib": round(held_by_ports / 1024),
        "top": [{"where": where, "kib": round(size / 1024), "blocks": count} for where, (size, count) in top],
    }


def span(source: tuple[list[str], int]) -> tuple[int, int]:
    lines, first = source
    return first, first + len(lines) - 1


def short(path: str, tree: str) -> str:
    for prefix in (tree + os.sep, os.path.dirname(os.__file__) + os.sep):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path.split("site-packages" + os.sep)[-1]


# -- the runs, from the parent ------------------------------------------------------------


def one_run(tree: str, services: int, servers: int, trace: bool = False) -> dict:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [sys.executable, os.path.abspath(__file__), "--child", tree, str(services), str(servers)]
    done = subprocess.run(
        [*args, *(["--trace"] if trace else [])], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"a run in {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def spread(values: list[float]) -> dict:
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summary(runs: list[dict]) -> dict:
    return {
        phase: {fig: spread([r["at"][phase][fig] for r in runs]) for fig in FIGURES}
        for phase in runs[0]["at"]
    } | {
        "pass_s": [spread([r["pass_s"][i] for r in runs]) for i in range(len(runs[0]["pass_s"]))],
        "modules_after_imports": spread([r["modules_after_imports"] for r in runs]),
    }


def describe(tree: str) -> str:
    import subprocess

    done = subprocess.run(
        ["git", "-C", tree, "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        print(json.dumps(child(argv[1], int(argv[2]), int(argv[3]), "--trace" in argv)))
        return
    trees = {"this": HERE}
    for option, name in (("--this", "this"), ("--against", "against")):
        if option in argv:
            i = argv.index(option)
            trees[name] = os.path.abspath(argv[i + 1])
            del argv[i : i + 2]
    services = int(argv[0]) if len(argv) > 0 else 1000
    servers = int(argv[1]) if len(argv) > 1 else 10
    runs = int(argv[2]) if len(argv) > 2 else 5

    from bench.event_pass import cpu_model
    from bench.results_file import save

    load_before = os.getloadavg()
    each: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(runs):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for name in order:
            each[name].append(one_run(trees[name], services, servers))
            print(f"run {i + 1}/{runs} {name}: {each[name][-1]['at']['passes']}", file=sys.stderr)
    traced = {name: one_run(tree, services, servers, trace=True)["trace"] for name, tree in trees.items()}

    result = {
        "label": os.environ.get("DOCKERLB_BENCH_LABEL", ""),
        "machine": f"{cpu_model()}; pinned to CPU(s) {sorted(os.sched_getaffinity(0))}; "
        f"nice {os.nice(0)}; native",
        "python": sys.version.split()[0],
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "ports": "in-memory stand-ins (harness/memory_ports.py), not the real adapters",
        "services": services,
        "servers_per_service": servers,
        "servers_present": services * servers,
        "runs": runs,
        "figures": "KiB, /proc/self/status; median, min and max over the runs",
        "trees": {
            name: {
                "path": tree,
                "commit": describe(tree),
                "summary": summary(each[name]),
                "retained_top": traced[name],
                "each_run": each[name],
            }
            for name, tree in trees.items()
        },
    }
    save("rss", result)


if __name__ == "__main__":
    main()
