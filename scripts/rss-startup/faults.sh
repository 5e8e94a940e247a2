#!/bin/bash
# faults.sh BIN OUTDIR [local|static] : start the server under perf (every page fault, with its
# data address and call chain), wait until /api/health answers and IDLE seconds more, save
# /proc/PID/{smaps,maps,status} and the resident pages, then SIGKILL it (no shutdown faults).
BIN=$1; OUT=$2; MODE=${3:-local}; IDLE=${IDLE:-3}
mkdir -p $OUT; rm -rf $OUT/db; mkdir -p $OUT/db
PORT=$((20000 + RANDOM % 20000))
ENVS=(PATH=/usr/bin:/bin SERVER_HOST=127.0.0.1 SERVER_PORT=$PORT DB_DIR=$OUT/db HOME=/tmp)
if [ "$MODE" = static ]; then ENVS+=(CONTAINER_DRIVER=static STATIC_WORKER_URL=http://127.0.0.1:9 WS_MAX_CONNECTIONS_PER_CLIENT=0 RUST_LOG=error); fi
env -i "${ENVS[@]}" $EXTRA perf record -q -m 65536 -e page-faults -c 1 -d --call-graph dwarf,16384 -o $OUT/perf.data -- $BIN >$OUT/out.log 2>&1 &
for i in $(seq 100); do curl -sf http://127.0.0.1:$PORT/api/health >/dev/null && break; sleep 0.1; done
sleep $IDLE
PID=$(pgrep -f "^$BIN" -n)
cp /proc/$PID/smaps $OUT/smaps; cp /proc/$PID/maps $OUT/maps; cp /proc/$PID/status $OUT/status
ls /proc/$PID/task | wc -l > $OUT/threads

python3 $(dirname $0)/respages.py $PID $BIN > $OUT/resident_pages
kill -9 $PID; wait
grep -E "VmRSS|RssAnon|RssFile|Threads" $OUT/status
