#!/usr/bin/env bash
# The server binary under WebSocket load (issue #16): `anywork-bench load` drives the release
# `anywork-server` (its own process, static driver) from one thread with a stand-in worker
# (its own process, the original AnyWork's worker protocol, answering at once). Figures go to
# docs/benchmarks.md by hand, with the command that printed them.
#
#   bash scripts/bench-load.sh cost      # server CPU and context switches per task at 1, 50,
#                                        # 200 and 1,000 sessions (SQLite), 2 runs each
#   bash scripts/bench-load.sh growth    # 10 → 100 → 1,000 → 10,000 sessions on SQLite and on
#                                        # PostgreSQL (its own, started here): table + PNG
#   bash scripts/bench-load.sh breakdown # strace -c and perf stat of the server at 200 × 20
#   bash scripts/bench-load.sh callgrind # instructions (callgrind Ir) and SQL statements per
#                                        # task at 20 × 10, repeatable on a loaded machine
#   bash scripts/bench-load.sh load ARGS # `anywork-bench load ARGS` (see `--help`)
#
# Outputs: target/bench-load/*.md and docs/img/load-growth.png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
# Every idle WebSocket costs a descriptor in the server and one in the load generator (which
# raises its own soft limit to the hard one; its children inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
what=${1:-cost}
shift || true
cargo build --release -p anywork-server -p anywork-bench
bench="${CARGO_TARGET_DIR:-target}/release/anywork-bench"
out="${CARGO_TARGET_DIR:-target}/bench-load"
mkdir -p "$out" docs/img
date -u "+%Y-%m-%d %H:%M UTC; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
case "$what" in
    cost)
        "$bench" load --sessions 1,50,200,1000 --turns 20 --min-tasks 500 --repeat 2 \
            --markdown "$out/cost.md" "$@"
        ;;
    growth)
        start_postgres
        trap stop_postgres EXIT
        "$bench" load --sessions 10,100,1000,10000 --turns 2 --min-tasks 1000 \
            --stores sqlite,postgres --database-url "$ANYWORK_TEST_DATABASE_URL" \
            --markdown "$out/growth.md" --plot docs/img/load-growth.png "$@"
        ;;
    breakdown)
        # Allocator calls through uprobes on the C library's malloc family (the binary uses
        # the system allocator); skipped where perf cannot place them.
        libc=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64/ {print $NF; exit}')
        events=task-clock,context-switches,cpu-migrations,page-faults
        for f in malloc calloc realloc free; do
            perf probe -q -x "$libc" --add "$f" 2>/dev/null || true
            perf list 2>/dev/null | grep -q "probe_libc:$f" && events="$events,probe_libc:$f"
        done
        "$bench" load --sessions 200 --turns 20 --perf-events "$events" --settle-ms 500 "$@"
        "$bench" load --sessions 200 --turns 20 --strace --settle-ms 500 "$@"
        ;;
    callgrind)
        # The profiles stay in $out/callgrind for callgrind_annotate.
        "$bench" load --sessions 20 --turns 10 --min-tasks 0 --settle-ms 500 --callgrind \
            --callgrind-dir "$out/callgrind" "$@"
        "$bench" load --sessions 20 --turns 10 --min-tasks 0 --settle-ms 500 --count-sql "$@"
        ;;
    load)
        "$bench" load "$@"
        ;;
    *)
        echo "usage: $0 cost|growth|breakdown|callgrind|load [anywork-bench load options]" >&2
        exit 2
        ;;
esac
