"""kvslim: fast LLM decoding through smaller, better-shaped KV caches.

One :class:`AttentionSpec` drives the attention modules, the cache layout, the two decode
kernels and the planner (see DESIGN.md in the docs).
"""

from kvslim.spec import AttentionSpec

__version__ = "0.1.0"
__all__ = ["AttentionSpec", "__version__"]
