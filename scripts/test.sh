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
cargo test
