#!/usr/bin/env bash
# Builds corepush in release mode and runs it. With no flags it listens on
# 0.0.0.0:1234 with one shard per core; any flag is passed on (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || {
    echo "run.sh: cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
}
cargo build --release --bin corepush
exec "${CARGO_TARGET_DIR:-target}/release/corepush" "$@"
