#!/usr/bin/env bash
# One command for the MoE bench: set-up (venv, kt_kernel, oneDNN), the C++
# bench binaries, then bench/moe_bench.py with the given arguments.
#   bench/run.sh --quick
#   bench/run.sh --models dsv2-lite --methods INT8 --tokens 1,512
# KT_BENCH_SKIP_SETUP=1 skips scripts/setup.sh (it reinstalls kt_kernel from
# the working tree into .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "${KT_BENCH_SKIP_SETUP:-0}" != 1 ]]; then
  scripts/setup.sh --bench
fi
export PATH="$ROOT/.venv/bin:$PATH"
cmake -S . -B build/bench -G Ninja -DKT_BUILD_BENCH=ON -DKT_BUILD_PYTHON=OFF >/dev/null
cmake --build build/bench
exec "$ROOT/.venv/bin/python" bench/moe_bench.py "$@"
