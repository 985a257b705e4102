#!/usr/bin/env bash
# Fails if an object compiled with instruction-set flags (src/avx2, src/avx512,
# src/amx) defines a weak (COMDAT) symbol. Such a symbol is an inline or
# template function that baseline code may also use; the linker keeps one copy,
# possibly the AVX-512 one, and baseline code would then execute AVX-512
# instructions on a CPU without them (SIGILL). See include/kt_kernel/types.h.
#
# --sanitizer-build: the objects come from a KT_SANITIZE build, whose
# instrumentation adds unwinding cleanups to the kernels and with them the
# weak data pointer DW.ref.__gxx_personality_v0. That symbol is data, not
# code, and in a normal build it flags a destructor in a kernel (see
# docs/DESIGN_NOTES.md), so it is let through only here.
set -euo pipefail
skip=""
if [[ "${1:-}" == "--sanitizer-build" ]]; then
  skip="DW.ref.__gxx_personality_v0"
  shift
fi
status=0
for obj in "$@"; do
  weak=$(nm -C --defined-only "$obj" | awk -v skip="$skip" '$2 ~ /^[WVuiv]$/ && $3 != skip {print "    " $0}')
  if [[ -n "$weak" ]]; then
    echo "$obj defines weak symbols:"
    echo "$weak"
    status=1
  fi
done
[[ $status == 0 ]] && echo "checked $# instruction-set objects: no weak symbols"
exit $status
