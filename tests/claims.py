"""A pytest plugin: guests side by side share one list of modules, each
module run whole by whichever guest claims it first.

The kernel tier runs two UML guests, one per CPU (tests/kernel/run-all.sh).
A fixed split of the modules leaves one CPU idle while the other still has
a quarter of an hour to go whenever a module's time changes, so both guests
are given every module, in the order asked (the longest first), and each
takes the next module no guest has taken yet. A claim is a symlink made in
DOCKERLB_CLAIMS (through hostfs, one directory on the host for both guests)
naming its owner: made whole or found there, never both. A module is run
whole by one guest, so its module-scoped fixtures are set up once (twice
only if that guest stalls mid-module and a new one finishes it).

A guest that stalled is followed by a new guest of the same owner
(DOCKERLB_CLAIMS_OWNER, tests/kernel/run-vm.sh): it takes back its owner's
modules, whose finished tests tests.progress has already left out.

Without DOCKERLB_CLAIMS set, pytest runs every test as usual.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest


def _claim(claims: str, owner: str, module: str) -> bool:
    # One step: a symlink is made whole with its target (the owner) or not
    # at all, so no guest ever sees a claim without its owner.
    path = os.path.join(claims, re.sub(r"[^A-Za-z0-9_.-]", "_", module))
    try:
        os.symlink(owner, path)
    except FileExistsError:
        return os.readlink(path) == owner
    return True


def _modules(items: list[pytest.Item]) -> list[list[pytest.Item]]:
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    return list(by_module.values())


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    claims = os.environ.get("DOCKERLB_CLAIMS")
    if not claims or session.config.option.collectonly:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} errors during collection")  # as pytest's own loop
    # No owner named: this process alone, so no later guest takes its modules back.
    owner = os.environ.get("DOCKERLB_CLAIMS_OWNER") or f"pid-{os.getpid()}"
    os.makedirs(claims, exist_ok=True)
    modules = iter(_modules(session.items))

    def next_claimed() -> list[pytest.Item] | None:
        for module in modules:
            if _claim(claims, owner, module[0].nodeid.split("::", 1)[0]):
                return module
        return None

    def items() -> Iterator[tuple[pytest.Item, pytest.Item | None]]:
        current = next_claimed()
        while current:
            # The next module is claimed before the last test of this one
            # runs: pytest tears a module's fixtures down by the next item.
            # (So a stop on that last test, -x or --maxfail, leaves the
            # module claimed and run by no one; CI passes neither.)
            following = None
            for i, item in enumerate(current):
                if i + 1 < len(current):
                    yield item, current[i + 1]
                else:
                    following = next_claimed()
                    yield item, following[0] if following else None
            current = following

    for item, nextitem in items():
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
    return True
