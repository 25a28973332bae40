#!/bin/bash
# The fixed SFT workload (benchmarks/sft_throughput.py) at two commits, interleaved: each commit runs its own copy of
# the script from a detached worktree, so a redesign that moved modules is measured as it was.
# Usage: benchmarks/sft_throughput_between.sh BEFORE AFTER [PAIRS=3]   (e.g. 14b64ab HEAD 3)
# Needs the venv of `make setup`; worktrees go to ${LORAKIT_BENCH_HOME:-~/.cache/lorakit-bench}/between/.
# Pairs alternate which commit runs first. Run nothing else meanwhile: the machine's noise is the figure's limit.
set -euo pipefail
before=${1:?usage: $0 BEFORE AFTER [PAIRS]} after=${2:?usage: $0 BEFORE AFTER [PAIRS]} pairs=${3:-3}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$repo/.venv/bin/python
home=${LORAKIT_BENCH_HOME:-$HOME/.cache/lorakit-bench}/between
mkdir -p "$home"
ln -sfn "$(cd "$repo/../shared" && pwd)" "$home/shared"  # sft_throughput.py reads ../shared/data beside the tree
for rev in "$before" "$after"; do
  dir=$home/$(git -C "$repo" rev-parse --short "$rev")
  [ -d "$dir" ] || git -C "$repo" worktree add -q --detach "$dir" "$rev"
done
for i in $(seq 1 "$pairs"); do
  order="$before $after"; [ $((i % 2)) -eq 0 ] && order="$after $before"
  for rev in $order; do
    dir=$home/$(git -C "$repo" rev-parse --short "$rev")
    echo "=== pair $i: $rev ($(date +%T))"
    (cd "$dir" && PYTHONPATH=$dir "$py" benchmarks/sft_throughput.py --modes packed --steps 10 --peak 1 --peak-bf16 1 \
      | grep -E "^(mode|packed)")
  done
done
