#!/usr/bin/env bash
# The project's test command (CI runs exactly this through .ci/run):
# formatting, lints, then every unit and integration test. The integration
# tests start real servers on free loopback ports and talk to them with real
# WebSocket clients; the flood test also runs the corepush-flood binary.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || {
    echo "test.sh: cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
}
# Tests open a few thousand sockets in one process: use the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
