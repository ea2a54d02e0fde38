#!/usr/bin/env bash
# Measures the cloud's resident memory per idle connected device: starts a cloud on loopback,
# connects N real `synesis tunnel run` devices (heartbeat 5 s), and compares the cloud's RSS
# before and after. Usage: scripts/measure-idle-devices.sh [N] [BIN_DIR]   (default 100, target/release)
set -euo pipefail
n=${1:-100}
bin=${2:-target/release}
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

"$bin/synesis-cloud" serve --listen 127.0.0.1:0 --data-dir "$work/cloud" >"$work/cloud.out" 2>"$work/cloud.err" &
cloud=$!
pids+=("$cloud")
until grep -q 'listening on' "$work/cloud.out" 2>/dev/null; do sleep 0.1; done
"$bin/synesis-cloud" admin --data-dir "$work/cloud" account create load >/dev/null
sleep 1
before=$(rss_kib "$cloud")

for i in $(seq 1 "$n"); do
  home="$work/dev$i"
  token=$("$bin/synesis-cloud" admin --data-dir "$work/cloud" token create --account load)
  SYNESIS_HOME=$home "$bin/synesis" cloud login --name "dev$i" "$token" >/dev/null
  SYNESIS_HOME=$home "$bin/synesis" tunnel run >/dev/null 2>&1 &
  pids+=("$!")
done

deadline=$((SECONDS + 120))
while :; do
  online=$("$bin/synesis-cloud" admin --data-dir "$work/cloud" devices --json | grep -o '"status":"online"' | wc -l)
  [ "$online" -ge "$n" ] && break
  [ $SECONDS -ge $deadline ] && { echo "only $online of $n online" >&2; exit 1; }
  sleep 1
done
sleep 12 # a few heartbeats each, so every connection is in its steady state
after=$(rss_kib "$cloud")
echo "devices online: $online"
echo "cloud RSS: before ${before} KiB, after ${after} KiB"
echo "per idle connected device: $(( (after - before) / n )) KiB"
