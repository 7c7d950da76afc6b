#!/usr/bin/env bash
# Connection flood against a local corepush server.
#
#   scripts/flood.sh [N] [extra corepush-flood flags...]
#
# Builds in release mode, widens the ephemeral port range if allowed, starts
# `corepush --listen 127.0.0.1:$FLOOD_PORT --shards $FLOOD_SHARDS`, runs
# corepush-flood with N connections (default: the most one server process
# can hold on this host) through calibrate, connect, hold, targeted,
# broadcast, churn and teardown, prints the report, and stops the server.
#
# Environment: FLOOD_SERVER_FLAGS (extra corepush flags, e.g. --no-pin when
# the client shares the server's cores, as it does on a small host),
# FLOOD_PORT (1234), FLOOD_API_PORT (1235: the server's --api-listen on
# 127.0.0.1), FLOOD_PUSH_VIA_API (1: also push the targeted schedule
# through that API, --push-via-api), FLOOD_SHARDS (nproc), FLOOD_PROCS
# (client processes; default from the fd limit), FLOOD_MSGS (25000),
# FLOOD_RATE (5000 msg/s), FLOOD_BROADCASTS (10), FLOOD_HOLD (10 s),
# FLOOD_CHURN (0.05).
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PORT="${FLOOD_PORT:-1234}"
API_PORT="${FLOOD_API_PORT:-1235}"
SHARDS="${FLOOD_SHARDS:-$(nproc)}"
SERVER_FLAGS="${FLOOD_SERVER_FLAGS:-}"
MSGS="${FLOOD_MSGS:-25000}"
RATE="${FLOOD_RATE:-5000}"
BROADCASTS="${FLOOD_BROADCASTS:-10}"
HOLD="${FLOOD_HOLD:-10}"
CHURN="${FLOOD_CHURN:-0.05}"
# Fds a process keeps for itself besides connections.
RESERVE=100

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then hard=1048576; fi
# The server raises its soft limit to the hard one; so does the flood.
server_max=$((hard - RESERVE))
per_proc=$((hard - RESERVE))

N="${1:-$server_max}"
shift || true
API_FLAGS=()
if [ "${FLOOD_PUSH_VIA_API:-0}" = 1 ]; then
    API_FLAGS=(--push-via-api "127.0.0.1:$API_PORT")
fi
case "$N" in
    '' | *[!0-9]*) echo "usage: $0 [N] [corepush-flood flags...]" >&2; exit 2 ;;
esac

if [ "$N" -gt "$server_max" ]; then
    cat >&2 <<EOF
flood.sh: one corepush process can hold about $server_max connections here
(open-file hard limit $hard, minus ~$RESERVE for itself), not $N.
Run with N <= $server_max, or raise the hard limit first:
  - in this shell (as root): ulimit -Hn $((N + 1000)); ulimit -n $((N + 1000))
  - for a systemd service: LimitNOFILE=$((N + 1000)) in its [Service] section
  - system-wide: /etc/security/limits.conf (nofile) and fs.nr_open >= that
EOF
    exit 2
fi
PROCS="${FLOOD_PROCS:-$(((N + per_proc - 1) / per_proc))}"
[ "$PROCS" -ge 1 ] || PROCS=1
if [ $((PROCS * per_proc)) -lt "$N" ]; then
    cat >&2 <<EOF
flood.sh: $PROCS client process(es) x $per_proc connections each hold only
$((PROCS * per_proc)) connections, not $N. Set FLOOD_PROCS=$(((N + per_proc - 1) / per_proc))
or raise the open-file limit (ulimit -n / LimitNOFILE=).
EOF
    exit 2
fi

echo "== building (release)" >&2
cargo build --release --bins >&2

# More ephemeral ports; keep the listen port below the range.
range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "")
low=$(echo "$range" | awk '{print $1}')
if [ -n "$low" ] && [ "$low" -gt 10000 ] && [ "$PORT" -lt 10000 ]; then
    if sysctl -q -w net.ipv4.ip_local_port_range="10000 65000" 2>/dev/null; then
        echo "== ephemeral port range widened from '$range' to 10000-65000" >&2
    else
        echo "== could not widen the ephemeral port range (not root?); source addresses spread over 127.0.0.0/8 instead" >&2
    fi
fi

log=$(mktemp /tmp/corepush-server.XXXXXX.log)
# shellcheck disable=SC2086 # SERVER_FLAGS is a list of flags
"$TARGET_DIR/release/corepush" --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
    --shards "$SHARDS" $SERVER_FLAGS 2>"$log" &
server=$!
stop_server() {
    stop_process "$server" 5 || true
    wait "$server" 2>/dev/null || true
}
trap stop_server EXIT

wait_for_line "$log" "$server" "listening on" server
grep "listening on" "$log" >&2

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, $(uname -r), $(free -g | awk '/Mem:/{print $2}') GiB" >&2
set +e
set -x
"$TARGET_DIR/release/corepush-flood" \
    --target "127.0.0.1:$PORT" --conns "$N" --procs "$PROCS" --server-pid "$server" \
    --hold-secs "$HOLD" --msgs "$MSGS" --msg-rate "$RATE" \
    --broadcasts "$BROADCASTS" --churn "$CHURN" ${API_FLAGS[@]+"${API_FLAGS[@]}"} "$@"
rc=$?
{ set +x; } 2>/dev/null
echo "== server log tail:" >&2
tail -n 5 "$log" >&2
rm -f "$log"
exit $rc
