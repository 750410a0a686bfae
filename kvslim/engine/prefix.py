"""Prefix caching: content-addressed full pages, reference counts and an LRU of freed cached pages.

A *full* page (``page_size`` tokens whose rows are all computed) is named by a digest chained
over the token ids of that page and of every page before it (SHA-256 of the parent's digest
and the page's ids), so two pages with equal digests hold the rows of equal prefixes, at
equal positions: a newly admitted sequence can point its block table at them instead of
recomputing them (vLLM's automatic prefix caching, SGLang's radix cache at page granularity).

:class:`PrefixCachingAllocator` is a :class:`~kvslim.engine.allocator.BlockAllocator` whose
pages carry reference counts. A page whose last user leaves goes back to the free list if it
has no digest, else to an LRU of *evictable* cached pages, which still count as free: the
allocator takes plain free pages first and evicts the least recently freed cached page only
when none is left. A sequence frees its pages last page first, so a prefix's tail is evicted
before its head (a head evicted first would leave the tail unreachable).

Pages written by a sequence are never shared until they are full and computed, and a shared
page is never written again: rows are written only at positions >= ``num_computed`` and a
sequence reuses at most ``(num_tokens - 1) // page_size`` pages, so at least one token (the
one whose logits pick the next token) is always computed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from kvslim.engine.allocator import SCRATCH_PAGES, BlockAllocator, OutOfPages

ROOT_DIGEST = b"kvslim-prefix-v1"


def page_digest(parent: bytes, ids) -> bytes:
    """Digest of a page holding token ``ids`` after the prefix whose last page digest is ``parent``."""
    return hashlib.sha256(parent + array("q", ids).tobytes()).digest()


def extend_digests(digests: list[bytes], tokens: list[int], page_size: int, num_pages: int) -> list[bytes]:
    """Extend ``digests`` (those of the first pages of ``tokens``) to the first ``num_pages`` full pages."""
    for i in range(len(digests), num_pages):
        parent = digests[-1] if digests else ROOT_DIGEST
        digests.append(page_digest(parent, tokens[i * page_size : (i + 1) * page_size]))
    return digests


class PrefixCachingAllocator(BlockAllocator):
    """Page allocator with reference counts and a digest -> page table of cached full pages.

    Args:
        num_pages: pages in each layer's pool (including the scratch page).
        page_size: tokens per page.
    """

    def __init__(self, num_pages: int, page_size: int):
        super().__init__(num_pages, page_size)
        self._ref: dict[int, int] = {}  # page -> users, for every allocated page
        self._digest_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages without users, oldest first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Pages an allocation may take: free ones and evictable cached ones."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        return len(self._ref)

    @property
    def num_cached(self) -> int:
        """Full pages that a later sequence could reuse (in use or evictable)."""
        return len(self._page_of)

    def refcount(self, page: int) -> int:
        return self._ref.get(page, 0)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.popleft()
            else:  # evict the least recently freed cached page
                p, _ = self._lru.popitem(last=False)
                del self._page_of[self._digest_of.pop(p)]
                self.evictions += 1
            self._ref[p] = 1
            pages.append(p)
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page (last page first); a page without users is freed or kept evictable."""
        for p in reversed(pages):
            r = self._ref.get(p)
            if r is None:
                raise ValueError(f"page {p} is not allocated (double free?)")
            if r > 1:
                self._ref[p] = r - 1
                continue
            del self._ref[p]
            if p in self._digest_of:
                self._lru[p] = None
            else:
                self._free.append(p)

    def match(self, digests: list[bytes]) -> list[int]:
        """Pages of the longest cached prefix of ``digests`` (no references taken)."""
        out = []
        for d in digests:
            p = self._page_of.get(d)
            if p is None:
                break
            out.append(p)
        return out

    def num_evictable(self, pages: list[int]) -> int:
        """How many of ``pages`` sit in the evictable LRU (sharing them takes them out of ``num_free``)."""
        return sum(1 for p in pages if p in self._lru)

    def share(self, pages: list[int]) -> None:
        """Take one reference to each of the cached ``pages`` (from :meth:`match`)."""
        for p in pages:
            if p in self._lru:
                del self._lru[p]
                self._ref[p] = 1
            elif p in self._ref:
                self._ref[p] += 1
            else:
                raise ValueError(f"page {p} is neither cached nor allocated")

    def register(self, page: int, digest: bytes) -> None:
        """Name the full, computed, allocated ``page`` by ``digest`` (first writer wins; idempotent)."""
        if page < SCRATCH_PAGES or page not in self._ref:
            raise ValueError(f"page {page} is not allocated")
        if digest in self._page_of or page in self._digest_of:
            return  # another sequence cached the same prefix first, or this page is already named
        self._page_of[digest] = page
        self._digest_of[page] = digest
