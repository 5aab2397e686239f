#!/bin/bash
# Peak memory of `serve --demo` under 16 concurrent clients (issue 17, item 11).
# usage: scripts/memory.sh <database_url> <label>   (after `cargo build --release`)
# Starts the release binary in a temporary directory on a free port, waits for /readyz, then
# 16 clients loop over token-stats (month, by_user, Kolkata hourly), a listing page and the CSV
# export for 20 s; prints VmHWM (peak RSS) and VmRSS after seeding and after the load.
BIN="$(cd "$(dirname "$0")/.." && pwd)/target/release/llm-tracker"
D=$(mktemp -d); cd $D
PORT=$((20000 + RANDOM % 10000))
DATABASE_URL="$1" BIND_ADDR=127.0.0.1:$PORT $BIN serve --demo > out.log 2>&1 &
PID=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && break; sleep 1; done
sleep 2
TOKEN=$(grep -oE "eyJ[A-Za-z0-9_.-]+" out.log | head -1)
echo "$2 after seeding: $(grep -E 'VmHWM|VmRSS' /proc/$PID/status | tr -s ' ' | tr '\n' ' ')"
END=$((SECONDS + 20))
for c in $(seq 1 16); do
  ( while [ $SECONDS -lt $END ]; do
      for path in "token-stats/?granularity=month" "token-stats/?include=by_user" "llm-usage/?page=3" "token-stats/?granularity=day&tz=Asia/Kolkata" "llm-usage/export.csv"; do
        curl -s -o /dev/null -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/api/v1/admin/$path"
      done
    done ) &
done
wait $(jobs -p | grep -v "^$PID$") 2>/dev/null
sleep 1
echo "$2 after load: $(grep -E 'VmHWM|VmRSS' /proc/$PID/status | tr -s ' ' | tr '\n' ' ')"
grep -c "" out.log >/dev/null
kill $PID; wait $PID 2>/dev/null; rm -rf $D
