#!/bin/bash
# order.sh OUT BIN...: the linker symbol ordering file of anywork-server (build.rs passes it
# to LLD as --symbol-ordering-file; crates/anywork-server/symbol-order.txt is the committed
# one). For each BIN (a release anywork-server), under callgrind, the functions it runs:
#   - static set-up (the benchmarks'): from exec until /api/health answers, the web UI's page,
#     three chats in one session over /ws (a first task and two followers; the stand-in worker
#     of anywork-bench answers them: $BENCH, default BIN's sibling anywork-bench), 35 s more
#     (the SQLite connections' idle close); the lease reaper every second;
#   - local set-up (the README's first command, empty DB_DIR): from exec through the start-up
#     health call to the in-process worker, the web UI's page, 3 s more.
# and, first, what an idle server runs: the same two set-ups, and the static one with its
# worker down (scripts/rss-startup/idle.sh measures that one), from exec through /api/health
# and 65 s more (the connections' idle close, 30-60 s after last use), no page, no chat.
# OUT = the names of those functions that BIN defines (mangled, one a line), over all BINs,
# in two groups, each sorted: what the idle runs ran, then what only the full runs ran (LLD
# links them in the list's order, so an idle server's code is packed at the front, and the
# code only a page or a chat runs, after it, stays out of the idle server's memory);
# after a header: the compiler and the packages (Cargo.lock) the names were made with, which
# tests/symbol_order.rs compares with the tree's. Names carry crate hashes that depend on the
# profile, so give one binary per profile the list should serve, e.g.
#   cargo build --release --locked -p anywork-server -p anywork-bench          # shipped: fat LTO
#   cp target/release/anywork-{server,bench} /tmp/fat/
#   CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
#     cargo build --release --locked -p anywork-server -p anywork-bench      # the benchmarks'
#   scripts/rss-startup/order.sh crates/anywork-server/symbol-order.txt /tmp/fat/anywork-server target/release/anywork-server
# Build BINs with ANYWORK_SYMBOL_ORDERING_FILE=off (the layout does not change the names, but
# this keeps the profile clean). order.sh check LIST BIN: how many of LIST's names BIN has.
set -e
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
names() { nm "$1" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u; }
if [ "$1" = check ]; then
  total=$(grep -vc '^#' "$2"); have=$(grep -v '^#' "$2" | sort -u | comm -12 - <(names "$3") | wc -l)
  echo "$have of $total names in $3 ($((100 * have / total)) %)"; exit 0
fi
OUT=$1; shift
ALL=$(mktemp)
run() { # BIN MODE [idle]: the functions (mangled) BIN ran in MODE, appended to $ALL
  local BIN=$1 MODE=$2 IDLE=$3 D PORT CG PID SPID=
  D=$(mktemp -d); PORT=$((20000 + RANDOM % 20000)); CG=$(mktemp)
  # The lease reaper every second instead of every 30 s: its code runs within the profile.
  local ENVS=(PATH=/usr/bin:/bin SERVER_HOST=127.0.0.1 SERVER_PORT=$PORT DB_DIR=$D HOME=/tmp REAP_INTERVAL_SECONDS=1)
  # The static set-up as the benchmarks and idle.sh run it (errors only); the local one as the
  # README's first command does (the default log level: its start-up writes info lines).
  if [ "$MODE" != local ]; then ENVS+=(RUST_LOG=error); fi
  if [ "$MODE" = static-down ]; then # a static server whose worker is not up (yet)
    ENVS+=(CONTAINER_DRIVER=static STATIC_WORKER_URL=http://127.0.0.1:9)
  elif [ "$MODE" = static ]; then
    local WPORT=$((PORT + 1)) BENCH=${BENCH:-$(dirname "$BIN")/anywork-bench}
    "$BENCH" stand-in --port $WPORT >/dev/null 2>&1 & SPID=$!
    ENVS+=(CONTAINER_DRIVER=static STATIC_WORKER_URL=http://127.0.0.1:$WPORT)
  fi
  env -i "${ENVS[@]}" valgrind --tool=callgrind --demangle=no --callgrind-out-file=$CG "$BIN" >/dev/null 2>&1 &
  PID=$!
  for i in $(seq 600); do curl -sf http://127.0.0.1:$PORT/api/health >/dev/null && break; sleep 0.2; done
  if [ -n "$IDLE" ]; then
    sleep 65 # what an idle server runs: past the SQLite connections' idle close (checked every 30 s: closed 30-60 s after last use)
  else
    curl -sf http://127.0.0.1:$PORT/ >/dev/null
    if [ "$MODE" = static ]; then python3 "$HERE/chat.py" $PORT 3 | tr "\n" " "; fi
    # static: past the SQLite connections' idle close (30 s) too.
    if [ "$MODE" = static ]; then sleep 35; else sleep 3; fi
  fi
  kill -INT $PID; wait $PID || true
  if [ -n "$SPID" ]; then kill $SPID; wait $SPID 2>/dev/null || true; fi
  grep -oE "^c?fn=\([0-9]+\) .*" $CG | sed -E 's/^c?fn=\([0-9]+\) //' >> $ALL
  echo "$(basename "$BIN") $MODE${IDLE:+ idle}: $(grep -cE '^fn=' $CG) functions"
  rm -rf $D $CG
}
IDLE_LIST=$(mktemp); LIST=$(mktemp)
for BIN in "$@"; do
  : > $ALL
  run "$BIN" static idle; run "$BIN" static-down idle; run "$BIN" local idle
  sort -u $ALL | comm -12 - <(names "$BIN") | tee -a $IDLE_LIST | wc -l | sed "s|^|idle: names defined in $BIN: |"
  : > $ALL
  run "$BIN" static; run "$BIN" local
  sort -u $ALL | comm -12 - <(names "$BIN") | tee -a $LIST | wc -l | sed "s|^|names defined in $BIN: |"
done
{
  echo "# anywork-server's linker symbol ordering file (build.rs; made by scripts/rss-startup/order.sh)."
  echo "# rustc: $(rustc -V)"
  python3 "$HERE/lockdeps.py" "$ROOT/Cargo.lock" anywork-server | sed 's/^/# lock: /'
  echo "# idle: the first $(sort -u $IDLE_LIST | wc -l) names, what an idle server runs; then what a page and chats add"
  sort -u $IDLE_LIST
  sort -u $LIST | comm -23 - <(sort -u $IDLE_LIST)
} > "$OUT"
rm -f $ALL $LIST $IDLE_LIST; grep -vc '^#' "$OUT" | sed "s|^|$OUT: |; s|$| names|"
