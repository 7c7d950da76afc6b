# Shared by the scripts that run servers: waiting for a line in a server's
# log, and stopping a process politely first. Sourced, not run.

# wait_for_line LOG PID TEXT WHAT: returns once LOG contains TEXT. If the
# process PID exits first, or TEXT has not come within 10 s, prints LOG
# and exits 1; WHAT names the process in the message.
wait_for_line() {
    local log=$1 pid=$2 text=$3 what=$4 me
    me=$(basename "$0")
    for _ in $(seq 100); do
        grep -q "$text" "$log" && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$me: $what exited; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "$me: $what did not print \"$text\" within 10 s; its log:" >&2
    cat "$log" >&2
    exit 1
}

# stop_process PID SECONDS: SIGTERM, and SIGKILL if it still runs SECONDS
# later. Returns 1 when it had to be killed. The caller `wait`s for it.
stop_process() {
    local pid=$1 tenths=$(($2 * 10))
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq "$tenths"); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    return 1
}
