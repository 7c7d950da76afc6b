#!/usr/bin/env bash
# corepush against another server speaking the same protocol (the tokio
# yardstick by default), side by side in the same minutes.
#
#   scripts/compare.sh [ROUNDS] [N]
#
# Runs the full flood (calibration, connect, hold, targeted at 5,000 msg/s,
# broadcasts, and a throughput sweep) against corepush and the other server,
# alternating which goes first, ROUNDS times (default 3) at N connections
# (default 19000), and prints the medians side by side with the shard-loop
# targets, and the bare relays the flood calibrates in the same minutes (one
# thread, and two threads handing records across: the floor of a server
# whose connections live on two shards). Each run's JSON goes to $COMPARE_OUT (default
# target/compare/<time>/), so the table can be rebuilt or checked later.
#
# Environment:
#   PEER_BIN        the other server's binary (default: the tokio yardstick,
#                   built with `cargo build --release` in
#                   ../shared/peers/tokio-push); it is started as
#                   `$PEER_BIN 127.0.0.1:PORT`
#   COREPUSH_FLAGS  extra corepush flags (default: --shards 2 --no-pin)
#   FLOOD_FLAGS     extra corepush-flood flags
#   COMPARE_PORT    first port (default 7400; two are used, below the
#                   ephemeral range)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ROUNDS="${1:-3}"
N="${2:-19000}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PEER_BIN="${PEER_BIN:-../shared/peers/tokio-push/target/release/tokio-push}"
COREPUSH_FLAGS="${COREPUSH_FLAGS:---shards 2 --no-pin}"
FLOOD_FLAGS="${FLOOD_FLAGS:-}"
PORT="${COMPARE_PORT:-7400}"
OUT="${COMPARE_OUT:-$TARGET_DIR/compare/$(date -u +%Y%m%dT%H%M%SZ)}"

if [ ! -x "$PEER_BIN" ]; then
    echo "compare.sh: no peer binary at $PEER_BIN; build it (cargo build --release in its directory) or set PEER_BIN" >&2
    exit 2
fi
echo "== building (release)" >&2
cargo build --release --bins >&2
mkdir -p "$OUT"
sysctl -q -w net.ipv4.ip_local_port_range="10000 65000" 2>/dev/null || true

# Runs one flood against one server; $1 = name, $2.. = the server command.
run_one() {
    local name="$1" round="$2"
    shift 2
    "$@" 2>"$OUT/$name-$round.log" &
    local server=$!
    sleep 1
    if ! kill -0 "$server" 2>/dev/null; then
        echo "compare.sh: $name did not start:" >&2
        cat "$OUT/$name-$round.log" >&2
        exit 1
    fi
    local addr="127.0.0.1:$PORT"
    # shellcheck disable=SC2086 # FLOOD_FLAGS is a list of flags
    "$TARGET_DIR/release/corepush-flood" --target "$addr" --conns "$N" --server-pid "$server" \
        --hold-secs 10 --msgs 25000 --msg-rate 5000 --broadcasts 10 \
        --sweep --sweep-secs 5 --no-hgrm --json $FLOOD_FLAGS \
        >"$OUT/$name-$round.txt" 2>/dev/null || true
    tail -n 1 "$OUT/$name-$round.txt" >"$OUT/$name-$round.json"
    stop_process "$server" 5 || true
    wait "$server" 2>/dev/null || true
    echo "== $(date -u +%H:%M:%S) $name round $round done" >&2
}

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, $(uname -r); results in $OUT" >&2
for round in $(seq "$ROUNDS"); do
    first=corepush
    [ $((round % 2)) -eq 0 ] && first=peer
    for name in $first $([ $first = corepush ] && echo peer || echo corepush); do
        if [ "$name" = corepush ]; then
            # shellcheck disable=SC2086 # COREPUSH_FLAGS is a list of flags
            run_one corepush "$round" "$TARGET_DIR/release/corepush" --listen "127.0.0.1:$PORT" $COREPUSH_FLAGS
        else
            run_one peer "$round" "$PEER_BIN" "127.0.0.1:$PORT"
        fi
    done
done

python3 - "$OUT" <<'EOF'
import json, glob, os, statistics, sys
out = sys.argv[1]

def runs(name):
    result = []
    for path in sorted(glob.glob(os.path.join(out, f"{name}-*.json"))):
        try:
            result.append(json.load(open(path)))
        except ValueError:
            pass
    return result

def get(run, *path):
    for key in path:
        if not isinstance(run, dict) or run.get(key) is None:
            return None
        run = run[key]
    return run

def figures(run):
    rate = 5000.0
    cores = get(run, "targeted", "cpu", "server_cores")
    return {
        "targeted p50 (us)": get(run, "targeted", "latency_us", "p50"),
        "targeted p99 (us)": get(run, "targeted", "latency_us", "p99"),
        "targeted p99.9 (us)": get(run, "targeted", "latency_us", "p999"),
        "bare 1-thread relay p50 (us)": get(run, "calibration", "oneway_latency_us", "p50"),
        "bare 1-thread relay p99 (us)": get(run, "calibration", "oneway_latency_us", "p99"),
        "bare 2-thread relay p50 (us)": get(run, "calibration", "oneway2_latency_us", "p50"),
        "bare 2-thread relay p99 (us)": get(run, "calibration", "oneway2_latency_us", "p99"),
        "targeted p99 / bare 2-thread relay p99": get(run, "ratios", "targeted_p99_vs_oneway2"),
        "server CPU per targeted msg (us)": None if cores is None else cores / rate * 1e6,
        "highest sustained rate (msg/s)": get(run, "sweep", "max_sustained_per_sec"),
        "user-space bytes per idle conn": get(run, "server", "bytes_per_conn"),
        "connect rate (conn/s)": get(run, "connections", "per_sec"),
        "connect rate / floor": get(run, "ratios", "connect_rate_vs_floor"),
        "broadcast last recipient p50 (ms)": (lambda v: None if v is None else v / 1000)(get(run, "broadcast", "last_recipient_us", "p50")),
        "broadcast last recipient / fanout floor": get(run, "ratios", "broadcast_last_recipient_p50_vs_fanout"),
        "idle server CPU (cores)": get(run, "hold", "cpu", "server_cores"),
        "lost+dup+misrouted+reordered": sum((get(run, "targeted", k) or 0) for k in ("lost", "duplicated", "misrouted", "reordered")),
    }

def medians(name):
    rows = [figures(r) for r in runs(name)]
    table = {}
    for key in (rows[0] if rows else {}):
        values = [r[key] for r in rows if r[key] is not None]
        table[key] = (statistics.median(values) if values else None, values)
    return table, len(rows)

ours, n_ours = medians("corepush")
peer, n_peer = medians("peer")
def show(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
print(f"\nmedians of {n_ours} corepush and {n_peer} peer runs ({out})")
print(f"{'figure':42} {'corepush':>12} {'peer':>12} {'ratio':>7}   corepush runs")
for key in ours:
    a, values = ours[key]
    b = peer.get(key, (None, []))[0]
    ratio = "-" if a is None or not b else f"{a / b:.2f}"
    print(f"{key:42} {show(a):>12} {show(b):>12} {ratio:>7}   {', '.join(show(v) for v in values)}")
EOF
