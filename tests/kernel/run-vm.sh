#!/usr/bin/env bash
# Kernel tier: pytest inside a UML guest (scripts/uml-vm.sh), a real IPVS
# kernel run as a process of this machine, pinned to one CPU. Runs the
# kernel tests, and the host tests whose branch depends on what the kernel
# has (IPVS, ipip), again where it has them.
#   usage: tests/kernel/run-vm.sh                    the whole tier
#          tests/kernel/run-vm.sh [pytest args...]   these tests
#   UML_RUN names the guest's output folder under build/ (default uml-run;
#   reruns add -2, -3), UML_CPU the CPU it is pinned to: tests/kernel/run-all.sh
#   runs two of these side by side, one per CPU, with DOCKERLB_CLAIMS set:
#   then each runs only the modules it claims first (tests/claims.py), and
#   a rerun after a stall takes back its own guest's (DOCKERLB_CLAIMS_OWNER).
# A guest that stalls (the UML kernel busy, no guest task running: see
# scripts/uml-watchdog.sh) is ended by uml-vm.sh's watchdog (so is one where
# no test finishes for 40 minutes: that one fails, never rerun). One guest
# alone stalled in CI and twice here, in a lazy vmap purge that
# scripts/uml/patches/0001-* now makes cheap; for whatever else may stall
# one, a stall is taken as the emulator's fault, not a test's: the tests
# that guest had not finished run in a new guest, at most UML_RERUNS
# (default 2) times, each stall and rerun said. A test that failed before a
# stall stays failed; one more stall fails the tier.
set -euo pipefail
cd "$(dirname "$0")/../.."
pytest=(.venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest -p tests.progress -p tests.claims
    --timeout 1800 -m "kernel or host")
if [ $# -eq 0 ]; then
    # -rP: the passed tests' output too (the storm prints its pass counts).
    set -- --durations=15 -rP tests/kernel \
        tests/host/test_cli_on_this_kernel.py tests/host/test_real_server_namespaces.py
fi
base=${UML_RUN:-uml-run}
finished=$PWD/build/$base.finished  # "OUTCOME NODEID" of the tests earlier guests finished
mkdir -p build && : > "$finished"
failed=()  # the ones of those that failed
for run in $(seq 1 $((${UML_RERUNS:-2} + 1))); do
    name=$base
    [ "$run" -gt 1 ] && name=$base-$run
    rc=0
    # tests/progress.py leaves out exactly the tests named in DOCKERLB_FINISHED.
    UML_RUN=$name DOCKERLB_FINISHED=$finished DOCKERLB_CLAIMS_OWNER=$base bash scripts/uml-vm.sh "${pytest[@]}" "$@" || rc=$?
    # 5: nothing left to run (a guest stalled after its last test).
    [ "$rc" -eq 5 ] && [ -s "$finished" ] && rc=0
    [ -f "build/$name/stalled" ] || break
    read -r first < "build/$name/stalled" || true
    if [[ $first != "no heartbeat"* ]]; then
        echo "== a test stopped finishing in a live guest (build/$name/stalled): not rerun" >&2
        rc=1
        break
    fi
    while read -r outcome nodeid; do
        echo "$outcome $nodeid" >> "$finished"
        [ "$outcome" = failed ] && failed+=("$nodeid")
    done < <(cat "build/$name/progress" 2> /dev/null)
    echo "== the UML guest stalled (build/$name/stalled says how); $(wc -l < "$finished")" \
        "tests finished so far, ${#failed[@]} of them failed"
    rc=1
    [ "$run" -le "${UML_RERUNS:-2}" ] && echo "== the tests not finished run in a new guest"
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== tests that failed in a guest that later stalled:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
exit "$rc"
