# Sourced by both guests (tcg-guest.sh, uml-guest.sh):
#   start_dockerd OUT [dockerd args...]
# starts dockerd on /var/lib/docker, logging to OUT/dockerd.log, and returns
# once it answers (0) or has given up or not answered in DOCKERD_WAIT half
# seconds (default 120: a minute) (1; the log's tail printed). Sets dockerd_pid.
start_dockerd() {
    local out=$1
    shift
    dockerd --data-root /var/lib/docker "$@" > "$out/dockerd.log" 2>&1 &
    dockerd_pid=$!
    # Stop waiting as soon as dockerd has given up (it exits when containerd
    # does not start): a failed boot is known a minute sooner.
    for _ in $(seq 1 "${DOCKERD_WAIT:-120}"); do
        docker info > /dev/null 2>&1 && return 0
        kill -0 "$dockerd_pid" 2> /dev/null || break
        sleep 0.5
    done
    docker info > /dev/null 2>&1 && return 0
    echo "dockerd did not start"
    tail -30 "$out/dockerd.log"
    return 1
}
