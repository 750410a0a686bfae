#!/usr/bin/env bash
# Rebuild the stripped FlashInfer carry in .whl/flashinfer/ from PyPI downloads.
#
#   bash benchmarks/peers/make_flashinfer_carry.sh          # from the repo root, any machine with pip
#
# Result (git-ignored via .git/info/exclude "/.whl/"; ~14.4 MB in all):
#   .whl/flashinfer/flashinfer-$FI_VERSION-stripped.tar.xz    (~11 MB; 130 MB unpacked)
#   .whl/flashinfer/apache_tvm_ffi-$TVM_FFI_VERSION-cp312-*.whl (3.3 MB; the device runs Python 3.12)
# benchmarks/peers/flashinfer_peer.py unpacks both into /tmp/kvslim_flashinfer/site on first use.
# The other dependencies FlashInfer declares (cuda-python, cuda-tile, nccl4py, nccl-extensions,
# nvidia-cudnn-frontend, nvidia-cutlass-dsl) are not needed by the decode / MLA paths; the rest
# (torch, numpy, jinja2, ninja, einops, nvidia-ml-py, requests, click, tabulate, packaging, tqdm,
# cuda-bindings) are already on the device.
set -euo pipefail
FI_VERSION=${FI_VERSION:-0.7.2.post1}
TVM_FFI_VERSION=${TVM_FFI_VERSION:-0.1.15.post2}
DL=${DL:-/tmp/fi}
PY=${PY:-python3}
ROOT=$(git rev-parse --show-toplevel)
OUT="$ROOT/.whl/flashinfer"
cd "$ROOT"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p "$DL" "$OUT"

fi_whl="$DL/flashinfer_python-$FI_VERSION-py3-none-any.whl"
[ -f "$fi_whl" ] || "$PY" -m pip download --no-deps --only-binary=:all: -d "$DL" "flashinfer-python==$FI_VERSION"
ls "$DL"/apache_tvm_ffi-"$TVM_FFI_VERSION"-cp312-cp312-manylinux*_x86_64.whl >/dev/null 2>&1 ||
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DL" "apache-tvm-ffi==$TVM_FFI_VERSION"

rm -f "$OUT"/flashinfer-*-stripped.tar.xz "$OUT"/apache_tvm_ffi-*.whl
"$PY" -m benchmarks.peers.strip_flashinfer "$fi_whl" "$OUT/flashinfer-$FI_VERSION-stripped.tar.xz"
cp "$DL"/apache_tvm_ffi-"$TVM_FFI_VERSION"-cp312-cp312-manylinux*_x86_64.whl "$OUT/"
ls -l "$OUT"
du -ch "$OUT"/* | tail -1
