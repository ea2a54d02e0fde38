#!/usr/bin/env bash
# One against two and four answers at once on a real model (issue 23 item 14): 96-token chat
# answers through the device's HTTP API (`synesis serve`) and through the cloud's in-process
# model (`sequences = 4`, `context = 4096`), each timed whole with curl / `cloud ask`.
# Usage: scripts/measure-concurrency.sh [MODEL.gguf] [BIN_DIR]
#   (default: Gemma 3 270M from ../shared/models/gemma.sh, target/debug)
set -euo pipefail
model=${1:-$(bash "$(dirname "$0")/../../shared/models/gemma.sh")}
bin=$(cd "${2:-target/debug}" && pwd)
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export PATH=$bin:$PATH
cd "$work"
wait_line() { for _ in $(seq 100); do grep -q "listening on" "$1" && return; sleep 0.2; done; echo "no start: $1" >&2; exit 1; }

export SYNESIS_HOME=$work/device
synesis model add "$model" --name m >/dev/null
synesis serve --listen 127.0.0.1:0 >serve.out 2>serve.err &
pids+=($!)
wait_line serve.out
addr=$(sed -n 's|listening on http://||p' serve.out | head -1)
ask() {
  curl -s -o /dev/null -w "%{time_total}\n" "http://$addr/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"m\",\"max_tokens\":96,\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"Write about the sea $1\"}]}"
}
ask warm >/dev/null
for n in 1 2 4; do
  s=$(date +%s.%N); p=()
  for i in $(seq "$n"); do ask "$i" >"t.$i" & p+=($!); done
  wait "${p[@]}"; e=$(date +%s.%N)
  echo "device HTTP: $n at once: $(echo "$e - $s" | bc) s (each: $(cat t.* | tr '\n' ' '))"; rm -f t.*
done

cat >cloud.toml <<TOML
[prices.m]
input_usd_per_mtok = "0.10"
output_usd_per_mtok = "0.40"
[models.m]
provider = "llama"
path = "$model"
context = 4096
sequences = 4
TOML
synesis-cloud serve --data-dir ./cloud --config cloud.toml --listen 127.0.0.1:0 >cloud.out 2>cloud.err &
pids+=($!)
wait_line cloud.out
export SYNESIS_HOME=$work/asker
synesis-cloud admin --data-dir ./cloud account create acme --tier managed >/dev/null
synesis-cloud admin --data-dir ./cloud token create --account acme | synesis cloud login - >/dev/null
synesis-cloud admin --data-dir ./cloud voucher create 10.00 | synesis cloud topup --voucher - >/dev/null
cask() {
  local s e; s=$(date +%s.%N)
  synesis cloud ask --model m --max-tokens 96 "Write about the sea $1" >/dev/null 2>&1
  e=$(date +%s.%N); echo "$e - $s" | bc
}
cask warm >/dev/null
for n in 1 2 4; do
  s=$(date +%s.%N); p=()
  for i in $(seq "$n"); do cask "$i" >"t.$i" & p+=($!); done
  wait "${p[@]}"; e=$(date +%s.%N)
  echo "cloud in-process: $n at once: $(echo "$e - $s" | bc) s (each: $(cat t.* | tr '\n' ' '))"; rm -f t.*
done
