"""Page allocator over one preallocated paged KV pool per layer (DESIGN.md §3 engine).

Every layer's pool has ``num_pages`` pages of ``page_size`` tokens (rows may differ in width by
layer: per-layer latent ranks), so one page id names the same slot in all layers and one free
list serves them all. Page 0 is kept
back as a scratch page: padded rows of a CUDA-graph batch write there, so a padded
block table never touches a live sequence.

The pool is sized from memory and the planner's bytes/token (seed 000 §3.3: a smaller
per-device row means more pages, hence more concurrent sequences).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from kvslim.rows import RowFormat, kv_dtype_name
from kvslim.spec import AttentionSpec

SCRATCH_PAGES = 1


class OutOfPages(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class BlockAllocator:
    """Free list of page ids ``SCRATCH_PAGES .. num_pages-1``.

    Args:
        num_pages: pages in each layer's pool (including the scratch page).
        page_size: tokens per page.
    """

    def __init__(self, num_pages: int, page_size: int):
        if not isinstance(num_pages, int) or num_pages <= SCRATCH_PAGES:
            raise ValueError(f"num_pages must be an int > {SCRATCH_PAGES}, got {num_pages!r}")
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(SCRATCH_PAGES, num_pages))
        self._used: set[int] = set()

    @property
    def num_usable(self) -> int:
        return self.num_pages - SCRATCH_PAGES

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} is not allocated (double free?)")
            self._used.remove(p)
            self._free.append(p)


def page_bytes(spec: AttentionSpec | Sequence[AttentionSpec], num_layers: int, page_size: int,
               dtype: torch.dtype | str, tp_size: int = 1) -> int:
    """Bytes one page takes over all layers on one rank (the planner's bytes/token x page).

    ``spec``: the layers' spec, or one per layer (per-layer latent ranks: the rows differ, the
    page is the sum). ``dtype``: the KV dtype (a torch dtype, or a name including ``fp8``, whose
    packed row with its scales is :class:`kvslim.rows.RowFormat`).
    """
    specs = [spec] * num_layers if isinstance(spec, AttentionSpec) else list(spec)
    if len(specs) != num_layers:
        raise ValueError(f"page_bytes: {len(specs)} layer specs for num_layers={num_layers}")
    kv = kv_dtype_name(dtype)
    return page_size * sum(RowFormat.for_spec(s, kv, tp_size).row_bytes for s in specs)


def num_pages_for_memory(spec: AttentionSpec | Sequence[AttentionSpec], num_layers: int, memory_bytes: int, *,
                         page_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """How many pages fit in ``memory_bytes`` on one rank (``spec``: as :func:`page_bytes`)."""
    n = int(memory_bytes) // page_bytes(spec, num_layers, page_size, dtype, tp_size)
    if n <= SCRATCH_PAGES:
        name = spec.name if isinstance(spec, AttentionSpec) else spec[0].name
        raise ValueError(
            f"{memory_bytes / 2**20:.1f} MiB holds only {n} pages of {page_size} tokens "
            f"({name}, {num_layers} layers): raise the memory or lower page_size"
        )
    return n


def free_device_memory(device: torch.device, mem_util: float = 0.9) -> int:
    """Bytes the KV pool may take on ``device``: ``mem_util`` x total minus what is in use."""
    if device.type != "cuda":
        raise ValueError("free_device_memory needs a CUDA device; on CPU pass --num-pages or --kv-memory")
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(total * mem_util) - used)
