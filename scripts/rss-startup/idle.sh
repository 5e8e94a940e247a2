#!/bin/bash
# idle.sh BIN MODE SECONDS...: start the server (local or static), read VmRSS/RssAnon/RssFile/Threads at each time after /api/health answers
# (SERVER_ENV='A=1 B=2': more variables for the server, e.g. MALLOC_CONF=narenas:1)
BIN=$1; MODE=$2; shift 2
D=$(mktemp -d /tmp/rss.XXXX); PORT=$((20000 + RANDOM % 20000))
ENVS=(PATH=/usr/bin:/bin SERVER_HOST=127.0.0.1 SERVER_PORT=$PORT DB_DIR=$D HOME=/tmp)
if [ "$MODE" = static ]; then ENVS+=(CONTAINER_DRIVER=static STATIC_WORKER_URL=http://127.0.0.1:9 WS_MAX_CONNECTIONS_PER_CLIENT=0 RUST_LOG=error); fi
ENVS+=($SERVER_ENV)
env -i "${ENVS[@]}" $BIN >/dev/null 2>&1 &
PID=$!
for i in $(seq 200); do curl -sf http://127.0.0.1:$PORT/api/health >/dev/null && break; sleep 0.05; done
T0=$(date +%s.%N); line="$(basename $(dirname $BIN)) $MODE:"
for s in "$@"; do
  while (( $(echo "$(date +%s.%N) - $T0 < $s" | bc) )); do sleep 0.2; done
  line="$line  ${s}s $(awk '/^(VmRSS|RssAnon|RssFile|Threads):/{printf "%s ", $2}' /proc/$PID/status)"
done
line="$line ro=$(awk -v b=$(basename $BIN) '$0 ~ b && $2=="r--p" && $3=="00000000"{p=1;next} /^[0-9a-f]+-/{p=0} p&&/^Rss:/{print $2; exit}' /proc/$PID/smaps) text=$(awk -v b=$(basename $BIN) '$0 ~ b && $2=="r-xp"{p=1;next} /^[0-9a-f]+-/{p=0} p&&/^Rss:/{print $2; exit}' /proc/$PID/smaps)"
[ -n "$THREADS" ] && for t in /proc/$PID/task/*; do cat $t/comm; done | sort | uniq -c | tr '\n' ' '
kill $PID; wait $PID 2>/dev/null; rm -rf $D
echo "$line"
