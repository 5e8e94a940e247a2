#!/usr/bin/env bash
# Server benchmarks: dispatch overhead (WebSocket chat → executor start) and tasks/s with
# concurrent sessions on SQLite, RSS per idle WebSocket session of the server binary.
# Figures go to docs/benchmarks.md by hand, with this command. Options: `--help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Every idle WebSocket costs a descriptor in the server and one in the benchmark.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
cargo build --release -p anywork-server -p anywork-worker -p anywork-bench
"${CARGO_TARGET_DIR:-target}/release/anywork-bench" server "$@"
