# Sourced by uml-vm.sh:
#   watch_guest PID OUT
# ends the UML guest PID (the `timeout` wrapping the kernel) when it stops
# making progress, after writing OUT/stalled: why, and what its host
# processes were doing. Two signs, read from files the guest writes through
# hostfs (scripts/uml-guest.sh, tests/progress.py):
#   - no heartbeat for UML_STALL seconds (default 120; the loop writes every
#     10 s, and the longest gap measured in a busy guest, mid-storm, was 12 s): the
#     whole guest is stuck. Seen on this machine class: the UML kernel's
#     process running (R, its host stack empty: busy in its own code or in
#     system calls), every guest process stopped in ptrace, no guest task
#     scheduled: two guests side by side (10 minutes, then ended by hand),
#     once in CI with one guest (over 50 minutes, until its timeout), twice
#     here with one (ended after 54 and 130 s by this watchdog);
#   - a heartbeat, but no test finished for UML_IDLE seconds (default 2400:
#     pytest's own --timeout of 1800 s per test, and its teardown): a task
#     stuck inside the guest, likely a test's or dockerlb's, so run-vm.sh
#     does not rerun it. The guest is first asked to record its tasks
#     (OUT/guest-tasks.txt) and its blocked tasks' stacks (the console,
#     OUT/console.log).
# OUT/stalled's first line starts with "no heartbeat" or "no test finished".

# The PIDs of a process and all its descendants.
_tree() {
    local pids=$1 next
    local all=$1
    while [ -n "$pids" ]; do
        next=$(ps -eo pid=,ppid= | awk -v p=" $pids " 'index(p, " " $2 " ") {printf "%s ", $1}')
        all="$all $next"
        pids=$next
    done
    echo "$all"
}

# What the guest's host processes are doing: state, kernel wait channel,
# CPU time twice 5 s apart (who spins), and the busiest one's kernel stack.
_host_view() {
    local pid=$1 pids busiest
    pids=$(_tree "$pid" | tr -s ' ' ',' | sed 's/^,//; s/,$//')
    echo "== host processes of the guest (pid,stat,wchan,cpu time)"
    ps -o pid,ppid,stat,wchan:32,time,pcpu -p "$pids" 2> /dev/null
    sleep 5
    echo "== 5 s later"
    ps -o pid,ppid,stat,wchan:32,time,pcpu -p "$pids" 2> /dev/null
    busiest=$(ps -o pid=,pcpu= -p "$pids" 2> /dev/null | sort -k2 -nr | awk 'NR == 1 {print $1}')
    if [ -n "$busiest" ]; then
        echo "== host kernel stack of $busiest, the busiest"
        cat "/proc/$busiest/stack" 2> /dev/null
        # The UML kernel is an ordinary program with its symbols: where it
        # spins is a backtrace away (three samples, a second apart).
        if command -v gdb > /dev/null; then
            for _ in 1 2 3; do
                echo "== where $busiest is (gdb)"
                timeout 30 gdb -q -p "$busiest" -batch -ex bt 2>&1 | grep -E '^#' | head -25
                sleep 1
            done
        fi
    fi
    grep -E '^(MemFree|Shmem|Cached):' /proc/meminfo
}

watch_guest() {
    # Run in the background from a `set -euo pipefail` script: here a failed
    # look (gdb unable to attach, a process gone before `kill`) must never
    # end the watchdog before it has ended the guest.
    set +e +o pipefail
    local pid=$1 out=$2 started now beat finished reason
    local beat_limit=${UML_STALL:-120} idle_limit=${UML_IDLE:-2400}
    started=$(date +%s)
    while kill -0 "$pid" 2> /dev/null; do
        sleep 15
        now=$(date +%s)
        beat=$(stat -c %Y "$out/heartbeat" 2> /dev/null || echo "$started")
        finished=$(stat -c %Y "$out/progress" 2> /dev/null || echo "$started")
        if ((now - beat > beat_limit)); then
            reason="no heartbeat from the guest for $((now - beat)) s (UML_STALL=$beat_limit)"
        elif ((now - finished > idle_limit)); then
            touch "$out/dump-request"
            sleep 30 # the heartbeat loop looks every 10 s
            # A test that finished meanwhile was slow, not stuck.
            [ "$(stat -c %Y "$out/progress" 2> /dev/null || echo "$started")" = "$finished" ] || continue
            reason="no test finished for $((now - finished)) s (UML_IDLE=$idle_limit); the guest's tasks are in $out/guest-tasks.txt, blocked tasks' stacks in $out/console.log"
        else
            continue
        fi
        kill -0 "$pid" 2> /dev/null || return 0 # it finished meanwhile
        {
            echo "$reason, at $(date -u +%T) after $((now - started)) s"
            _host_view "$pid"
            if [ -f "$out/guest-tasks.txt" ]; then
                echo "== the guest's own view"
                cat "$out/guest-tasks.txt"
            fi
        } > "$out/stalled.tmp" 2>&1
        mv "$out/stalled.tmp" "$out/stalled"
        # SIGKILL: a stalled UML kernel does not act on a polite signal.
        # Every host process of the guest runs the kernel's binary with its
        # command line (dlb_out=OUT): a helper the kernel forks while the
        # tree is walked is still found that way.
        for _ in 1 2 3; do
            # shellcheck disable=SC2046
            kill -KILL $(_tree "$pid") 2> /dev/null
            pkill -KILL -f "dlb_out=$out " 2> /dev/null || true
            sleep 1
        done
        return 0
    done
}
