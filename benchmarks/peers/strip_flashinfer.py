"""Strip the flashinfer-python wheel down to what its JIT decode / MLA kernels need.

    python -m benchmarks.peers.strip_flashinfer WHEEL OUT.tar.xz

Keeps (paths inside the wheel):

- every file of the Python package outside ``flashinfer/data/`` (all ``.py``; ``import
  flashinfer`` pulls in ~330 modules and the wrappers import more lazily, so no module is
  dropped), except the kernel sources (``.cu``/``.cuh``/``.c``/``.h``/``.md``) bundled
  under ``flashinfer/experimental/`` and ``flashinfer/moe_ep/``, and the cuDNN-FROST MoE
  artifacts;
- ``flashinfer/data/include/`` (FlashInfer's own headers), whole;
- ``flashinfer/data/csrc/*.{cu,cuh,h,jinja,...}`` at the top level only, each under 300 kB
  (the batch_decode / batch_prefill / batch_mla sources and their jinja templates; the
  large fused-MoE / KDA / GDN / sampling sub-folders go);
- the include roots that ``flashinfer/jit/cpp_ext.py`` passes to nvcc: vendored CCCL
  (``cccl/{cub/cub,libcudacxx/include,thrust/thrust}``; they shadow the toolkit's copy, so
  they must stay), CUTLASS (``cutlass/include``, ``cutlass/tools/util/include``; the sm90
  MLA / prefill kernels include cute) and ``spdlog/include``;
- the dist-info (minus RECORD) and the small top-level ``b12x`` package.

Everything is written into one .tar.xz (the headers compress ~8x), which the peer loader
(``flashinfer_peer.py``) unpacks on the device.
"""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile

DROP_UNDER = ("flashinfer/experimental/", "flashinfer/moe_ep/")
DROP_SUFFIX = (".cu", ".cuh", ".c", ".h", ".md")
KEEP_DATA_TREES = (
    "flashinfer/data/include/",
    "flashinfer/data/cccl/cub/cub/",
    "flashinfer/data/cccl/libcudacxx/include/",
    "flashinfer/data/cccl/thrust/thrust/",
    "flashinfer/data/cutlass/include/",
    "flashinfer/data/cutlass/tools/util/include/",
    "flashinfer/data/spdlog/include/",
)
CSRC = "flashinfer/data/csrc/"
CSRC_MAX = 300_000


def keep(name: str, size: int) -> bool:
    if name.endswith("/"):
        return False
    if name.startswith("flashinfer/data/"):
        if name.startswith(KEEP_DATA_TREES):
            return True
        if name.startswith(CSRC):
            return "/" not in name[len(CSRC) :] and size <= CSRC_MAX
        return False
    if name.startswith("flashinfer/"):
        if name.startswith(DROP_UNDER) and name.endswith(DROP_SUFFIX):
            return False
        return "/cudnn_frost/artifacts/" not in name
    if ".dist-info/" in name:
        return not name.endswith("/RECORD")
    return name.startswith("b12x/")


def main(wheel: str, out: str) -> None:
    n = raw = 0
    with zipfile.ZipFile(wheel) as z, tarfile.open(out, "w:xz", preset=6) as t:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            if not keep(info.filename, info.file_size):
                continue
            data = z.read(info)
            ti = tarfile.TarInfo(info.filename)
            ti.size = len(data)
            ti.mode = 0o644
            ti.mtime = 0
            t.addfile(ti, io.BytesIO(data))
            n += 1
            raw += len(data)
    print(f"{out}: {n} files, {raw / 1e6:.1f} MB unpacked")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
