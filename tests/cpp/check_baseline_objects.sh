#!/usr/bin/env bash
# Fails if an object compiled at baseline x86-64 flags contains a VEX/EVEX
# or AMX instruction (anything named v*, k-mask moves, tile*/tdp*, or a
# ymm/zmm register). Baseline code runs before and regardless of dispatch, so
# one such instruction would SIGILL on a CPU without AVX. Objects of the
# instruction-set folders (kt_avx512, kt_avx2, kt_amx) are skipped: only the
# dispatcher calls into them, after checking the CPU. The emulated AMX build
# (kt_amx_emu) is baseline code and is checked.
set -euo pipefail
pattern='[[:space:]](v[a-z0-9]+|tile[a-z]+|tdp[a-z0-9]+|ldtilecfg|sttilecfg|kmov[bwdq])[[:space:]]|%[yz]mm'
checked=0
status=0
for obj in "$@"; do
  case "$obj" in
    */kt_avx512.dir/*|*/kt_avx2.dir/*|*/kt_amx.dir/*) continue ;;
  esac
  checked=$((checked + 1))
  hits=$(objdump -d --no-show-raw-insn "$obj" | grep -E "$pattern" | head -5 || true)
  if [[ -n "$hits" ]]; then
    echo "$obj (baseline) contains instructions beyond x86-64:"
    echo "$hits"
    status=1
  fi
done
if [[ $checked == 0 ]]; then
  echo "no baseline objects given"
  exit 1
fi
[[ $status == 0 ]] && echo "checked $checked baseline objects: no AVX/AVX-512/AMX instructions"
exit $status
