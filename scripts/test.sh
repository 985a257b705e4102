#!/usr/bin/env bash
# Runs every test: the C++ GoogleTest suite (through ctest) and the Python
# suite (pytest), each backend that this CPU can run. Sets itself up first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
VPY="$ROOT/.venv/bin/python"
VBIN="$ROOT/.venv/bin"

echo "== C++ tests (GoogleTest via ctest)"
"$VBIN/cmake" -S . -B build/cpp -G Ninja -DKT_BUILD_TESTS=ON -DKT_BUILD_PYTHON=OFF \
  -DCMAKE_MAKE_PROGRAM="$VBIN/ninja" >/dev/null
"$VBIN/cmake" --build build/cpp -j "$(nproc)"
(cd build/cpp && "$VBIN/ctest" --output-on-failure -j "$(nproc)")

echo "== Python tests (pytest)"
"$VPY" -m pytest -q tests/python "$@"
