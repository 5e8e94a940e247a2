#!/usr/bin/env bash
# Soak: the release server binary holds 1,000 WebSocket sessions, each chatting every 10 s,
# for 10 minutes (a stand-in worker answers at once); RSS, fds, store size, tasks, errors and
# latency over time go to docs/soak-<store>.csv and .png. Fails on any error or lost task.
#   scripts/soak.sh                     # SQLite
#   scripts/soak.sh --store postgres    # starts a PostgreSQL of its own unless
#                                       # ANYWORK_TEST_DATABASE_URL is set
# Options (sessions, rate, duration, sampling): `anywork-bench soak --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
# Every WebSocket costs a descriptor in the server and one in the benchmark.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
cargo build --release -p anywork-server -p anywork-bench
if [[ " $* " == *" postgres "* || " $* " == *"--store=postgres"* ]] && [ -z "${ANYWORK_TEST_DATABASE_URL:-}" ]; then
    start_postgres
    trap stop_postgres EXIT
fi
"${CARGO_TARGET_DIR:-target}/release/anywork-bench" soak "$@"
