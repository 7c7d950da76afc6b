#!/usr/bin/env bash
# A cluster on this host: one Redis and N corepush nodes joined through it.
#
#   scripts/cluster.sh [N] [extra corepush flags...]
#
# Builds in release mode, starts redis-server on a free port below 10000
# (the first free one from $CLUSTER_REDIS_PORT, 6390) and N nodes (default
# 3) on free ports below 10000 (from $CLUSTER_BASE_PORT, 9001), each with
# --shards $CLUSTER_SHARDS (1) and --cluster redis://127.0.0.1:PORT. It
# prints their addresses and pids and the corepush-flood command that
# spreads connections over the nodes, then waits; Ctrl-C stops everything.
#
# Nodes run with --no-pin: with one shard each, every node would pin its
# shard to the same first core. CLUSTER_PIN=1 keeps pinning.
#
# With CLUSTER_FLOOD set (to corepush-flood flags, e.g. "--conns 102000
# --msgs 25000 --broadcasts 5"), it runs that flood over every node instead
# of waiting, prints the Redis server's CPU over the run, stops everything
# and exits with the flood's status: the 100,000-connection benchmark in
# docs/benchmarks.md is `CLUSTER_FLOOD="..." scripts/cluster.sh 6 ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

N="${1:-3}"
shift || true
case "$N" in
    '' | *[!0-9]* | 0) echo "usage: $0 [N>=1] [corepush flags...]" >&2; exit 2 ;;
esac
SHARDS="${CLUSTER_SHARDS:-1}"
REDIS_FROM="${CLUSTER_REDIS_PORT:-6390}"
NODES_FROM="${CLUSTER_BASE_PORT:-9001}"
PIN_FLAG="--no-pin"
[ "${CLUSTER_PIN:-0}" = 1 ] && PIN_FLAG=""
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if ! command -v redis-server >/dev/null; then
    echo "cluster.sh: redis-server not found: apt-get install redis-server" >&2
    exit 1
fi

echo "== building (release)" >&2
cargo build --release --bins >&2

# A port nothing listens on (a connect to it fails).
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port_from() {
    local p=$1
    while ! port_free "$p"; do
        p=$((p + 1))
    done
    if [ "$p" -ge 10000 ]; then
        echo "cluster.sh: no free port between $1 and 9999" >&2
        exit 1
    fi
    echo "$p"
}

logs=$(mktemp -d /tmp/corepush-cluster.XXXXXX)
pids=()
redis_pid=""
stop_all() {
    trap - INT TERM EXIT
    echo >&2
    echo "== stopping" >&2
    for pid in "${pids[@]}" $redis_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}" $redis_pid; do
        stop_process "$pid" 5 || true
        wait "$pid" 2>/dev/null || true
    done
    echo "== stopped; logs in $logs" >&2
}
trap 'stop_all; exit 130' INT TERM
trap stop_all EXIT

redis_port=$(free_port_from "$REDIS_FROM")
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    >"$logs/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do
    port_free "$redis_port" || break
    kill -0 "$redis_pid" 2>/dev/null || { cat "$logs/redis.log" >&2; exit 1; }
    sleep 0.05
done
port_free "$redis_port" && { echo "cluster.sh: redis did not start" >&2; cat "$logs/redis.log" >&2; exit 1; }
url="redis://127.0.0.1:$redis_port"

addrs=()
apis=()
next=$NODES_FROM
for i in $(seq 0 $((N - 1))); do
    port=$(free_port_from "$next")
    api=$(free_port_from $((port + 1)))
    next=$((api + 1))
    # shellcheck disable=SC2086 # PIN_FLAG is empty or one flag
    "$TARGET_DIR/release/corepush" --listen "127.0.0.1:$port" --shards "$SHARDS" $PIN_FLAG \
        --api-listen "127.0.0.1:$api" --cluster "$url" "$@" 2>"$logs/node-$i.log" &
    pids+=($!)
    addrs+=("127.0.0.1:$port")
    apis+=("127.0.0.1:$api")
    wait_for_line "$logs/node-$i.log" "${pids[$i]}" "cluster: link up" "node $i"
done

echo "redis    127.0.0.1:$redis_port  pid $redis_pid"
flood="$TARGET_DIR/release/corepush-flood"
for i in "${!addrs[@]}"; do
    echo "node $i   ${addrs[$i]}  pid ${pids[$i]}  api http://${apis[$i]}"
    flood+=" --target ${addrs[$i]}"
done
for pid in "${pids[@]}"; do
    flood+=" --server-pid $pid"
done
if [ -n "${CLUSTER_FLOOD:-}" ]; then
    ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
    hz=$(getconf CLK_TCK)
    before=$(ticks "$redis_pid")
    start=$(date +%s.%N)
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, $(uname -r)" >&2
    # Each node's memory per connection: its RSS before the flood, then
    # (every 2 s, with no process heavier than curl and grep, since the
    # sampler shares the cores with what it measures) its RSS and its
    # connection count from /stats.
    rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
    samples="$logs/node-samples"
    for i in "${!pids[@]}"; do
        echo "base $i $(rss_kb "${pids[$i]}")"
    done >"$samples"
    (
        while sleep 2; do
            for i in "${!pids[@]}"; do
                conns=$(curl -s --max-time 1 "http://${apis[$i]}/stats" |
                    grep -o '"total": *{[^}]*}' | grep -o '"connections": *[0-9]*' | tr -dc 0-9) || continue
                [ -n "$conns" ] && echo "at $i $conns $(rss_kb "${pids[$i]}")"
            done
        done >>"$samples"
    ) &
    sampler=$!
    set +e
    # shellcheck disable=SC2086 # both are lists of flags
    $flood $CLUSTER_FLOOD
    rc=$?
    set -e
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    # The sample with the most connections per node (the hold phase).
    awk '$1 == "base" { base[$2] = $3 }
        $1 == "at" && $3 >= conns[$2] { conns[$2] = $3; rss[$2] = $4 }
        END {
            print "per node at its most connections: connections, RSS before -> then, user-space bytes per connection"
            for (i = 0; i in base; i++) if (conns[i] > 0)
                printf "  node %s  %6d conns  %7.1f -> %7.1f MiB  %5.0f B/conn\n", i, conns[i], base[i] / 1024, rss[i] / 1024, (rss[i] - base[i]) * 1024 / conns[i]
        }' "$samples"
    after=$(ticks "$redis_pid")
    end=$(date +%s.%N)
    awk -v t=$((after - before)) -v hz="$hz" -v s="$start" -v e="$end" \
        'BEGIN { printf "redis-server CPU over the flood: %.2f s in %.1f s (%.2f cores)\n", t / hz, e - s, t / hz / (e - s) }'
    exit $rc
fi

cat <<EOF

Logs: $logs
Flood, connections round-robin over the nodes (most targeted messages cross nodes):
  $flood --conns 3000 --msgs 5000 --broadcasts 2
Push from outside, as any system with a Redis client can:
  redis-cli -p $redis_port PUBLISH corepush:u:u7 'hello u7'
  redis-cli -p $redis_port PUBLISH corepush:all 'hello everyone'
Ctrl-C stops everything.
EOF

while sleep 1; do
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "cluster.sh: node $i (pid ${pids[$i]}) exited; its log: $logs/node-$i.log" >&2
            exit 1
        fi
    done
    if [ -n "$redis_pid" ] && ! kill -0 "$redis_pid" 2>/dev/null; then
        echo "cluster.sh: redis (pid $redis_pid) exited; nodes keep retrying" >&2
        redis_pid=""
    fi
done
