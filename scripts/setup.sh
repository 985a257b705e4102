#!/usr/bin/env bash
# Brings a fresh Debian/Ubuntu machine to the point where kt_kernel builds,
# its tests run and the demo runs: system packages (only those missing),
# a virtual environment in .venv, and kt_kernel installed into it.
#   scripts/setup.sh            runtime + test dependencies
#   scripts/setup.sh --bench    also oneDNN (the peer the benchmarks measure)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

want_bench=0
[[ "${1:-}" == "--bench" ]] && want_bench=1

apt_pkgs=(g++ make pkg-config libhwloc-dev libgtest-dev python3-venv)
[[ $want_bench == 1 ]] && apt_pkgs+=(libdnnl-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
# torch is for tests and benchmarks only (pinned: a CPU build); the package itself needs numpy.
"$VPY" -m pip install -q --disable-pip-version-check \
  "numpy>=1.22" "pytest>=7" "torch==2.13.0" "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja \
  gguf safetensors atheris "transformers>=5"
echo "[setup] building and installing kt_kernel"
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation "$ROOT"
"$VPY" -c "import kt_kernel; print('[setup] kt_kernel', kt_kernel.__version__, 'backends:', kt_kernel.backends())"
