#!/bin/bash
# order.sh BIN OUT: the functions BIN (a release anywork-server) runs from exec until /api/health
# answers and 3 s more (static driver, fresh DB_DIR), under callgrind, as a linker symbol
# ordering file (mangled names, one a line). Relink with it (LLD only; names carry crate hashes,
# so make it again after any dependency, compiler or profile change; stale names are skipped):
#   ANYWORK_SYMBOL_ORDERING_FILE=$PWD/OUT cargo build --release -p anywork-server
set -e
BIN=$1; OUT=$2; D=$(mktemp -d); PORT=$((20000 + RANDOM % 20000)); CG=$(mktemp)
env -i PATH=/usr/bin:/bin SERVER_HOST=127.0.0.1 SERVER_PORT=$PORT DB_DIR=$D HOME=/tmp \
  CONTAINER_DRIVER=static STATIC_WORKER_URL=http://127.0.0.1:9 RUST_LOG=error \
  valgrind --tool=callgrind --demangle=no --callgrind-out-file=$CG "$BIN" >/dev/null 2>&1 &
PID=$!
for i in $(seq 300); do curl -sf http://127.0.0.1:$PORT/api/health >/dev/null && break; sleep 0.2; done
sleep 3; kill -INT $PID; wait $PID || true
grep -oE "^c?fn=\([0-9]+\) .*" $CG | sed -E 's/^c?fn=\([0-9]+\) //' | sort -u > $CG.fns
nm "$BIN" | awk '$2 ~ /[tT]/ {print $3}' | sort -u | comm -12 $CG.fns - > "$OUT"
rm -rf $D $CG $CG.fns; wc -l "$OUT"
