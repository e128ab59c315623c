"""The seed's lab, balanced by dockerlb, on the Docker engine of this kernel.

A director container, two busybox web servers labelled
dockerlb.vip=1.2.3.4:8000, a client that routes 1.2.3.4 via the director, and
`dockerlb run --netns container:<director> --vip-cidr 1.2.3.4/32` (1.2.3.4 is
no private address: dockerlb takes it only when told). Prints the director's IPVS
table, `dockerlb status`, and who answered each request; then cleans up
(unless --keep).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.dockerlab import Lab, http_server_cmd, in_netns, pid_of, wait_for  # noqa: E402

VIP, PORT = "1.2.3.4", 8000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the lab and controller running")
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the controller's

    lab = Lab(docker.from_env())
    controller = None
    try:
        net = lab.network("lab")
        director = lab.run("director", network=net)
        webs = {
            n: lab.run(n, http_server_cmd(PORT), labels={"dockerlb.vip": f"{VIP}:{PORT}"}, network=net)
            for n in ("web1", "web2")
        }
        client = lab.run("client", network=net, cap_add=["NET_ADMIN"])
        client.exec_run(["ip", "route", "add", f"{VIP}/32", "via", lab.ip(director, net)])
        print(
            f"director {director.name}; real servers "
            + ", ".join(f"{c.name} {lab.ip(c, net)}" for c in webs.values())
        )

        cmd = [
            *(sys.executable, "-m", "dockerlb.app.cli", "run"),
            *("--netns", f"container:{director.name}", "--vip-cidr", f"{VIP}/32"),
        ]
        print("$ " + " ".join(cmd[2:]).replace("dockerlb.app.cli", "dockerlb"), flush=True)
        controller = subprocess.Popen(cmd, cwd=ROOT)
        pid = pid_of(director)
        wait_for(lambda: in_netns(pid, "ipvsadm", "-Ln").count("Masq") == 2, 60, what="both real servers")

        print("\n$ ipvsadm -Ln   # in the director's namespace")
        print(in_netns(pid, "ipvsadm", "-Ln"))
        print(f"$ dockerlb status --netns container:{director.name}")
        status = subprocess.run(
            [sys.executable, "-m", "dockerlb.app.cli", "status", "--netns", f"container:{director.name}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        print(status.stdout)
        names = {c.id[:12]: name for name, c in webs.items()}
        print(f"{args.requests} requests from {client.name} to {VIP}:{PORT}:")
        for i in range(args.requests):
            r = client.exec_run(["sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {VIP} {PORT}"])
            body = r.output.decode(errors="replace").strip().splitlines()
            who = names.get(body[-1].strip() if body else "", "FAILED")
            print(f"  request {i + 1:>2}: answered by {who}")
        if args.keep:
            print("\n--keep: leaving the lab and the controller running")
            controller = None
            return 0
        return 0
    finally:
        if controller is not None:
            controller.terminate()
            controller.wait(timeout=30)
        if not args.keep:
            lab.close()


if __name__ == "__main__":
    sys.exit(main())
