#!/usr/bin/env bash
# Runs every test: the C++ GoogleTest suite (through ctest) and the Python
# suite (pytest), each backend that this CPU can run. Sets itself up first.
#   scripts/test.sh [pytest args]        the normal run
#   scripts/test.sh --sanitize[=PARTS] [pytest args]
#       sanitizer builds instead, in their own build folders; PARTS is a
#       comma list of (default: all three)
#         asan-cpp  ctest under ASan + UBSan (build/asan)
#         asan-py   the Python suite under ASan + UBSan, importing the module
#                   of build/asan (staged in build/asan/py), not the installed one
#         tsan      the thread-pool, topology, layer-queue and multi-sub-pool MoE layer tests
#                   under TSan (build/tsan)
#       Any finding fails the run (UBSan does not recover; ASan and TSan halt).
#   KT_TEST_SKIP_SETUP=1 skips scripts/setup.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

sanitize=""
case "${1:-}" in
  --sanitize) sanitize="asan-cpp,asan-py,tsan"; shift ;;
  --sanitize=*) sanitize="${1#--sanitize=}"; shift ;;
esac

# KT_TEST_SKIP_SETUP=1: the machine is set up already (.venv and, for the
# normal run, kt_kernel installed in it).
[[ "${KT_TEST_SKIP_SETUP:-0}" == 1 ]] || "$ROOT/scripts/setup.sh"
VPY="$ROOT/.venv/bin/python"
VBIN="$ROOT/.venv/bin"

if [[ -z "$sanitize" ]]; then
  echo "== C++ tests (GoogleTest via ctest)"
  "$VBIN/cmake" -S . -B build/cpp -G Ninja -DKT_BUILD_TESTS=ON -DKT_BUILD_PYTHON=OFF \
    -DCMAKE_MAKE_PROGRAM="$VBIN/ninja" >/dev/null
  "$VBIN/cmake" --build build/cpp -j "$(nproc)"
  (cd build/cpp && "$VBIN/ctest" --output-on-failure -j "$(nproc)")

  echo "== Python tests (pytest)"
  "$VPY" -m pytest -q tests/python "$@"
  exit 0
fi

want() { [[ ",$sanitize," == *",$1,"* ]]; }
for part in ${sanitize//,/ }; do
  case "$part" in asan-cpp|asan-py|tsan) ;; *) echo "unknown --sanitize part '$part' (asan-cpp, asan-py, tsan)" >&2; exit 2 ;; esac
done

# RelWithDebInfo rather than Release: pybind11 strips Release modules, and the
# reports need the symbols.
configure() {  # build-dir sanitizer python(ON/OFF)
  local extra=()
  [[ $3 == ON ]] && extra=(-DPython_EXECUTABLE="$VPY" -Dpybind11_DIR="$("$VPY" -m pybind11 --cmakedir)")
  "$VBIN/cmake" -S . -B "$1" -G Ninja -DKT_SANITIZE="$2" -DKT_BUILD_TESTS=ON -DKT_BUILD_PYTHON="$3" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_MAKE_PROGRAM="$VBIN/ninja" "${extra[@]}" >/dev/null
  "$VBIN/cmake" --build "$1" -j "$(nproc)"
}
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

if want asan-cpp || want asan-py; then
  echo "== ASan + UBSan build (build/asan)"
  configure build/asan address "$(want asan-py && echo ON || echo OFF)"
fi

if want asan-cpp; then
  echo "== C++ tests under ASan + UBSan"
  (cd build/asan && ASAN_OPTIONS="detect_leaks=1:halt_on_error=1" "$VBIN/ctest" --output-on-failure -j "$(nproc)")
fi

if want asan-py; then
  echo "== Python tests under ASan + UBSan"
  # The package's Python files with the ASan module beside them, first on the
  # path: the installed kt_kernel would otherwise be imported.
  stage=build/asan/py
  rm -rf "$stage" && mkdir -p "$stage"
  cp -r python/kt_kernel "$stage/"
  find "$stage" \( -name '_kt_kernel*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
  cp build/asan/_kt_kernel*.so "$stage/kt_kernel/"
  # Python itself is not instrumented: the ASan runtime must be loaded first,
  # and libstdc++ with it (ASan's __cxa_throw interceptor needs it present at
  # start-up, or the first C++ exception aborts). CPython keeps objects alive
  # until exit by design, so leaks are not reported. pytest captures stderr
  # and a finding kills the process before it could show it: reports go to
  # files, printed below.
  logs=build/asan/py-logs
  rm -rf "$logs" && mkdir -p "$logs"
  export_py=(env PYTHONPATH="$ROOT/$stage"
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$ROOT/$logs/asan"
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$ROOT/$logs/ubsan")
  "${export_py[@]}" "$VPY" -c "import kt_kernel, sys; f = kt_kernel._kt_kernel.__file__; print('[asan-py] module', f); sys.exit(0 if f.startswith('$ROOT/$stage/') else 1)"
  status=0
  # -v: when a finding kills the process, the last line names the test that ran.
  "${export_py[@]}" "$VPY" -m pytest -v -p no:cacheprovider tests/python "$@" || status=$?
  if compgen -G "$logs/*" >/dev/null; then
    echo "== sanitizer reports ($logs):"
    cat "$logs"/*
    status=1
  fi
  [[ $status == 0 ]] || { echo "Python tests under ASan failed" >&2; exit "$status"; }
fi

if want tsan; then
  echo "== TSan build (build/tsan): the pool, topology and queue tests, and the MoE layer over two sub-pools"
  configure build/tsan thread OFF
  (cd build/tsan && TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" \
    "$VBIN/ctest" --output-on-failure -j "$(nproc)" -R '^(ThreadPool|Topology|LayerQueue|MoeConfig|AmxBackend)\.')
fi
echo "== sanitizer runs clean: $sanitize"
