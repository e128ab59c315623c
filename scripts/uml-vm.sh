#!/usr/bin/env bash
# Run a command in a User-Mode Linux kernel that has IPVS (built by
# scripts/uml-kernel.sh): the same Linux as on a server, run as a process of
# this machine, so guest user space runs at native speed. The guest's root
# is this machine's / (hostfs, read-write); scripts/uml-guest.sh puts tmpfs
# over what the guest must not share (/run, /tmp, /var/lib/docker), starts
# dockerd and runs the command. Output and exit code come back in build/uml-run.
#   usage: scripts/uml-vm.sh COMMAND [ARGS...]    (run from the repo root)
#   UML_MEMORY (default 4G), UML_TIMEOUT seconds (default 4500),
#   UML_RUN: the output folder's name under build/ (default uml-run); guests
#   with different UML_RUN can run side by side (one CPU each);
#   UML_KERNEL: another UML kernel binary than scripts/uml-kernel.sh's (to
#   time two builds side by side, e.g. with and without a patch).
#   A watchdog (scripts/uml-watchdog.sh) ends a guest that has stalled and
#   leaves build/$UML_RUN/stalled saying why; the guest's finished tests are
#   in build/$UML_RUN/progress (tests/progress.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kernel=${UML_KERNEL:-$(bash "$root/scripts/uml-kernel.sh" | tail -n 1)}
out="$root/build/${UML_RUN:-uml-run}"
rm -rf "$out" && mkdir -p "$out"
printf '%q ' "$@" > "$out/command"
# The guest's environment: what the command needs from ours, nothing more.
for v in UML_DOCKERD_ARGS DOCKERLB_STORM DOCKERLB_BENCH_RUNS DOCKERLB_BENCH_LABEL DOCKERLB_BENCH_PROFILE DOCKERLB_FINISHED DOCKERLB_CLAIMS DOCKERLB_CLAIMS_OWNER PYTEST_ADDOPTS; do
    [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}" >> "$out/env"
done
: >> "$out/env"
# UML backs the guest's memory with a file in TMPDIR: /dev/shm is tmpfs.
# One host CPU for the whole guest: the UML kernel and its processes hand
# control back and forth with ptrace at every system call and page fault;
# on one CPU each hand-over is a context switch, across two it is a wake-up
# of an idle CPU. Measured here: `docker start` 5.7 s -> 2.0 s, a page
# fault ~200 us -> ~56 us. UML_CPU picks the CPU (side-by-side guests).
TMPDIR=/dev/shm timeout "${UML_TIMEOUT:-4500}" taskset -c "${UML_CPU:-0}" "$kernel" mem="${UML_MEMORY:-4G}" \
    root=/dev/root rootfstype=hostfs rootflags=/ rw init="$root/scripts/uml-guest.sh" dlb_out="$out" \
    con=null con0=fd:0,fd:1 < /dev/null > "$out/console.log" 2>&1 &
uml=$!
# shellcheck source=scripts/uml-watchdog.sh
. "$root/scripts/uml-watchdog.sh"
watch_guest "$uml" "$out" &
watchdog=$!
set +e
wait "$uml"
uml_rc=$?
set -e
kill "$watchdog" 2> /dev/null || true
wait "$watchdog" 2> /dev/null || true
cat "$out/guest.log" 2>/dev/null || { echo "the guest wrote no log; its console said:"; tail -40 "$out/console.log"; }
if [ -f "$out/stalled" ]; then
    echo "the UML guest was ended by the watchdog:" >&2
    cat "$out/stalled" >&2
    exit 1
fi
[ -f "$out/rc" ] || { echo "the UML guest did not finish (exit $uml_rc; timeout is ${UML_TIMEOUT:-4500} s)" >&2; exit 1; }
exit "$(cat "$out/rc")"
