#!/usr/bin/env bash
# Churn soak against a local corepush server.
#
#   scripts/soak.sh [TOTAL] [extra corepush-flood flags...]
#
# Builds in release mode, starts
#
#   corepush --listen 127.0.0.1:$SOAK_PORT --api-listen 127.0.0.1:$SOAK_API_PORT
#            --shards $(nproc) --no-pin --handshake-timeout-ms 5000
#            --login-timeout-ms 3000 --ping-interval-ms 1000
#            --idle-timeout-ms 5000 --close-timeout-ms 500
#
# (short login, idle and close timeouts, so the half-open connections are
# reaped within the run, yet some seconds long, so that a stall of a busy
# host does not fail a live connection's upgrade or login, nor close a
# steady connection: 4 s past the ping; --no-pin because the flood shares
# the cores), then runs corepush-flood
# --soak-conns TOTAL (default 1,000,000): TOTAL connects and disconnects,
# a quarter each clean, abrupt (reset), unlogged (upgraded, never logged
# in) and silent (logged in, then silent), as fast as the host allows,
# while $SOAK_STEADY steady connections carry targeted traffic; then the
# steady ones close and the server's connection and uid counts, open
# descriptors and RSS must come back (docs/benchmarks.md, "Churn soak").
# Stops the server with SIGTERM. Exits non-zero when anything failed, the
# server included (it must still run at the end, and stop cleanly).
#
# Environment: SOAK_PORT (1236), SOAK_API_PORT (1237), SOAK_SHARDS (nproc),
# SOAK_SERVER_FLAGS (replaces --no-pin and the timeouts above; then set
# SOAK_CLOSE_MS to its --close-timeout-ms), SOAK_CLOSE_MS (500: silent
# connections keep their socket 200 ms longer than this after the server
# closed them), SOAK_STEADY (1000), SOAK_PROCS (2), SOAK_MSGS (5000 a
# round), SOAK_RATE (1000 msg/s).
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PORT="${SOAK_PORT:-1236}"
API_PORT="${SOAK_API_PORT:-1237}"
SHARDS="${SOAK_SHARDS:-$(nproc)}"
CLOSE_MS="${SOAK_CLOSE_MS:-500}"
SERVER_FLAGS="${SOAK_SERVER_FLAGS:---no-pin --handshake-timeout-ms 5000 --login-timeout-ms 3000 --ping-interval-ms 1000 --idle-timeout-ms 5000 --close-timeout-ms $CLOSE_MS}"
STEADY="${SOAK_STEADY:-1000}"
PROCS="${SOAK_PROCS:-2}"
MSGS="${SOAK_MSGS:-5000}"
RATE="${SOAK_RATE:-1000}"

TOTAL="${1:-1000000}"
shift || true
case "$TOTAL" in
    '' | *[!0-9]*) echo "usage: $0 [TOTAL] [corepush-flood flags...]" >&2; exit 2 ;;
esac

# Soak connections open at once per worker: what the server's descriptors
# leave after the steady ones and a reserve of 2000 (the server still
# holds some the flood is done with: it closes after the client), shared by
# the workers, at most 9000 each (one worker process holds hard-limit -
# 100). At 20000 that is 8500 (the server peaked at 18,018 descriptors;
# with 9000 it reached 19,006 of its ~19,950).
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then hard=1048576; fi
room=$(((hard - 2000 - STEADY) / PROCS))
per_worker=$((hard - 100 - (STEADY + PROCS - 1) / PROCS))
SLOTS=9000
[ "$room" -lt "$SLOTS" ] && SLOTS=$room
[ "$per_worker" -lt "$SLOTS" ] && SLOTS=$per_worker
if [ "$SLOTS" -lt 100 ]; then
    echo "soak.sh: the open-file limit ($hard) leaves too little room for the soak; raise it (ulimit -Hn)" >&2
    exit 2
fi

echo "== building (release)" >&2
cargo build --release --bins >&2

log=$(mktemp /tmp/corepush-soak-server.XXXXXX.log)
# shellcheck disable=SC2086 # SERVER_FLAGS is a list of flags
"$TARGET_DIR/release/corepush" --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
    --shards "$SHARDS" $SERVER_FLAGS 2>"$log" &
server=$!
stopped=0
server_rc=0
stop_server() {
    [ "$stopped" = 1 ] && return
    stopped=1
    if ! stop_process "$server" 10; then
        echo "soak.sh: the server did not stop within 10 s of SIGTERM; killed it" >&2
        server_rc=1
    fi
    wait "$server" 2>/dev/null || server_rc=$?
}
trap 'stop_server; rm -f "$log"' EXIT

wait_for_line "$log" "$server" "api listening on" server
grep "listening on" "$log" >&2

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, $(uname -r), $(free -g | awk '/Mem:/{print $2}') GiB, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
# shellcheck disable=SC2086
echo "== server: corepush --listen 127.0.0.1:$PORT --api-listen 127.0.0.1:$API_PORT --shards $SHARDS" $SERVER_FLAGS >&2
set +e
set -x
"$TARGET_DIR/release/corepush-flood" \
    --target "127.0.0.1:$PORT" --stats-api "127.0.0.1:$API_PORT" --server-pid "$server" \
    --conns "$STEADY" --procs "$PROCS" --msgs "$MSGS" --msg-rate "$RATE" \
    --soak-conns "$TOTAL" --soak-slots "$SLOTS" --soak-reap-secs 20 \
    --soak-linger-ms $((CLOSE_MS + 200)) "$@"
rc=$?
{ set +x; } 2>/dev/null
alive=1
kill -0 "$server" 2>/dev/null || alive=0
stop_server
echo "== server log tail:" >&2
tail -n 5 "$log" >&2
if [ "$alive" = 0 ]; then
    echo "soak.sh: FAILED: the server was no longer running at the end (exit status $server_rc)" >&2
    exit 1
fi
if [ "$server_rc" != 0 ]; then
    echo "soak.sh: FAILED: the server exited with status $server_rc after SIGTERM" >&2
    exit 1
fi
if [ "$rc" != 0 ]; then
    echo "soak.sh: FAILED (corepush-flood exit status $rc)" >&2
fi
exit $rc
