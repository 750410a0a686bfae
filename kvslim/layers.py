"""Layers every model block shares: RMSNorm (Llama / DeepSeek), the SwiGLU MLP, a per-head linear
map (:class:`HeadLinear`, the query side of converted QK-norm models), and the fusion of Linear
layers that read the same input into one GEMM (:func:`fuse_linears`).

They live on the ground floor so that attention modules, the model and tensor-parallel
shards all build on the same definitions (DESIGN.md §3).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm as in Llama / DeepSeek (statistics in fp32, weight applied after the cast)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class HeadLinear(nn.Module):
    """One linear map per head, no bias: ``[..., H, in] -> [..., H, out]``, weight ``[H, out, in]``."""

    def __init__(self, heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, out_features, in_features))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hi,hoi->...ho", x, self.weight)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with Hugging Face Llama names."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(self, ("gate_proj", "up_proj"), x)
        return self.down_proj(nn.functional.silu(gate) * up)


class FusedLinear:
    """One GEMM for several ``nn.Linear`` layers of one module that read the same input.

    The weight (and bias) are concatenated once; the original layers' parameters are then
    replaced by views into the concatenation, so memory is not doubled, the state dict keeps
    its names and in-place updates of either stay in sync. It is deliberately *not* a
    submodule (no extra state-dict keys): fuse after the model has its final device and dtype
    (``Module.to`` replaces the views by copies; :func:`linears` then drops the stale fusion and
    calls the layers one by one again).
    """

    def __init__(self, layers: list[nn.Linear]):
        with_bias = [lin.bias is not None for lin in layers]
        if any(with_bias) and not all(with_bias):
            raise ValueError("fuse_linears: either every layer has a bias or none does")
        if len({(lin.in_features, lin.weight.dtype, lin.weight.device) for lin in layers}) != 1:
            raise ValueError("fuse_linears: the layers must share in_features, dtype and device")
        self.sizes = [lin.out_features for lin in layers]
        with torch.no_grad():
            self.weight = torch.cat([lin.weight for lin in layers])
            self.bias = torch.cat([lin.bias for lin in layers]) if with_bias[0] else None
        self.layers = layers
        for lin, w in zip(layers, self.weight.split(self.sizes)):
            lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        if self.bias is not None:
            for lin, b in zip(layers, self.bias.split(self.sizes)):
                lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
        self._ptr = self.weight.data_ptr()

    def intact(self) -> bool:
        """Whether the layers' weights still are views of the fused weight (no ``.to`` since)."""
        return self.layers[0].weight.data_ptr() == self._ptr

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def linears(module: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """``[getattr(module, n)(x) for n in names]``, as one GEMM when those layers were fused."""
    table = module.__dict__.get("_fused")
    fused = table.get(names) if table else None
    if fused is not None:
        if torch.compiler.is_compiling() or fused.intact():
            return fused(x)
        del table[names]  # the layers were moved or cast since fusing: their own weights are the truth
    return [getattr(module, n)(x) for n in names]


def fuse_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Fuse ``module``'s Linear layers ``names`` (same input) into one GEMM for :func:`linears`."""
    fused = module.__dict__.setdefault("_fused", {})
    fused[names] = FusedLinear([getattr(module, n) for n in names])
