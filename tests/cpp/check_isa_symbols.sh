#!/usr/bin/env bash
# Fails if an object compiled with instruction-set flags (src/avx2, src/avx512,
# src/amx) defines a weak (COMDAT) symbol. Such a symbol is an inline or
# template function that baseline code may also use; the linker keeps one copy,
# possibly the AVX-512 one, and baseline code would then execute AVX-512
# instructions on a CPU without them (SIGILL). See include/kt_kernel/types.h.
set -euo pipefail
status=0
for obj in "$@"; do
  # DW.ref.__gxx_personality_v0 is data, not code: the weak pointer to the
  # C++ personality routine that any object with unwinding cleanups carries
  # (sanitizer builds add such cleanups to the kernels). No instruction in it.
  weak=$(nm -C --defined-only "$obj" | awk '$2 ~ /^[WVuiv]$/ && $3 != "DW.ref.__gxx_personality_v0" {print "    " $0}')
  if [[ -n "$weak" ]]; then
    echo "$obj defines weak symbols:"
    echo "$weak"
    status=1
  fi
done
[[ $status == 0 ]] && echo "checked $# instruction-set objects: no weak symbols"
exit $status
