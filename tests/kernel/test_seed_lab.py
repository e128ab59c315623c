"""Kernel tier: the seed's lab, driven by labels, on a real IPVS kernel.

Director, VIP 1.2.3.4:8000, two real servers by NAT, scheduler wlc; a client
on the same Docker network routes the VIP via the director.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import pytest

from harness.dockerlab import wait_for
from tests.kernel.conftest import PORT, VIP, TableWatcher

pytestmark = pytest.mark.kernel
SERVICE = ("TCP", f"{VIP}:{PORT}", "wlc")


def requests(lab, n=20) -> Counter:
    answers = lab.requests(n)
    assert len(answers) == n
    return Counter(answers)


def exited_at(container) -> float:
    container.reload()
    stamp = container.attrs["State"]["FinishedAt"]  # RFC 3339 with nanoseconds
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")


def test_the_seed_lab_balances_follows_stop_and_start_and_survives_a_restart(seed_lab, controllers):
    lab = seed_lab
    web1, web2 = lab.ip("web1"), lab.ip("web2")
    both = {SERVICE: {(f"{web1}:{PORT}", "Masq", "1"), (f"{web2}:{PORT}", "Masq", "1")}}

    ctl = controllers("--netns", f"container:{lab.director.name}")
    ctl.wait_ready()
    assert lab.table() == both

    # 20 requests from the client: every one answered, by both servers.
    got = requests(lab)
    assert got[None] == 0, f"failed requests: {got}"
    assert set(got) == {"web1", "web2"}

    # docker stop: out of the table once the container has exited (how soon
    # is printed; bench/ measures it, tests do not time it).
    watcher = TableWatcher(lab)
    lab.webs["web2"].stop(timeout=1)
    gone = watcher.first_time({f"{web1}:{PORT}"}, 30)
    assert lab.table() == {SERVICE: {(f"{web1}:{PORT}", "Masq", "1")}}
    latency = gone - exited_at(lab.webs["web2"])
    print(f"web2 seen gone {latency:+.3f}s after it exited ({watcher.polls} polls)")
    got = requests(lab)
    assert got == Counter({"web1": 20}), got

    # docker start: back in the table, and answering again. Without a
    # HEALTHCHECK it joins when its process starts, so wait for httpd itself
    # before sending traffic. wlc counts web1's TIME_WAIT connections against
    # it, so the fresh web2 may take every new connection: IPVS being right.
    lab.webs["web2"].start()
    wait_for(lambda: lab.table() == both, 60, what="web2 back")
    wait_for(lambda: lab.answers_directly("web2"), 60, interval=0.5, what="web2's httpd")
    got = requests(lab)
    assert got[None] == 0 and got["web2"] > 0, got

    # Restart: the table, its counters and connections stay untouched. A
    # service flushed and made again would count from 0; no traffic comes
    # after this, but the kernel folds its per-CPU counters every 2 s, so a
    # later read may still be higher (never lower). Counted first: the first
    # 20 connections at least, so a flush would show.
    key = f"TCP {VIP}:{PORT}"
    before = wait_for(lambda: (s := lab.stats())[key][0] >= 20 and s, 30, what="the counters folded")

    def not_lower() -> bool:
        now = lab.stats()
        assert now.keys() == before.keys(), (now, before)
        return all(n >= b for k in before for n, b in zip(now[k], before[k], strict=True))

    assert ctl.stop() == 0
    assert lab.table() == both and not_lower(), lab.stats()  # stopping flushes nothing
    again = controllers(
        "--netns", f"container:{lab.director.name}", "--resync-interval", "1", name="restarted"
    )
    again.wait_ready()
    again.wait_passes(3)  # the start-up sync and two periodic resyncs: any stray work would show
    assert not_lower(), (lab.stats(), before)
    assert "applied:" not in again.log(), again.log()
    assert lab.table() == both


def test_a_bad_label_is_one_log_line_and_everything_else_keeps_working(seed_lab, controllers):
    lab = seed_lab
    bad = lab.lab.run("bad", labels={"dockerlb.vip": f"{VIP}:70000"}, network=lab.net)
    # Someone else's service in the same namespace: never touched.
    lab.ipvsadm("-A", "-t", "5.5.5.5:80", "-s", "rr")
    lab.ipvsadm("-a", "-t", "5.5.5.5:80", "-r", f"{lab.ip('web1')}:80", "-m", "-w", "7")
    foreign_before = [line for line in lab.ipvsadm("-Ln").splitlines() if "5.5.5.5" in line]

    ctl = controllers("--netns", f"container:{lab.director.name}", "--resync-interval", "1")
    ctl.wait_ready()
    assert lab.table()[SERVICE] == {
        (f"{lab.ip('web1')}:{PORT}", "Masq", "1"),
        (f"{lab.ip('web2')}:{PORT}", "Masq", "1"),
    }
    assert requests(lab, 10)[None] == 0
    ctl.wait_passes(4)  # the start-up sync and three periodic resyncs, each seeing the bad label
    lines = [line for line in ctl.log().splitlines() if bad.name in line]
    assert len(lines) == 1, lines
    assert "'dockerlb.vip'" in lines[0] and "port must be 1..65535" in lines[0]
    assert [line for line in lab.ipvsadm("-Ln").splitlines() if "5.5.5.5" in line] == foreign_before
    assert lab.table()[("TCP", "5.5.5.5:80", "rr")] == {(f"{lab.ip('web1')}:80", "Masq", "7")}


def test_a_restarted_director_gets_its_table_again_in_its_new_namespace(seed_lab, controllers):
    lab = seed_lab
    ctl = controllers("--netns", f"container:{lab.director.name}", "--resync-interval", "2")
    ctl.wait_ready()
    lab.director.restart(timeout=1)
    lab.__dict__.pop("director_pid", None)  # a new process, a new namespace
    director_ip = lab.lab.ip(lab.director, lab.net)
    r = lab.client.exec_run(["ip", "route", "replace", f"{VIP}/32", "via", director_ip])
    assert r.exit_code == 0, r.output
    wait_for(lambda: SERVICE in lab.table() and len(lab.table()[SERVICE]) == 2, 90, interval=1, what="table")
    assert "reopening on the new namespace" in ctl.log()
    assert "nft command" not in ctl.log()  # a vanished namespace is not a missing tool
    got = requests(lab, 10)
    assert got[None] == 0, got
