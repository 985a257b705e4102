#!/usr/bin/env bash
# The demo: a MoE layer at a real model's shape, accuracy and speed printed.
# Sets itself up first. Extra arguments go to `python -m kt_kernel demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m kt_kernel demo "$@"
