"""The packed cache row: what one token stores per layer, in bytes (DESIGN.md §1, §4 FP8 KV).

A row holds ``row_dim`` elements (``AttentionSpec.row_dim_per_rank``). With a 16/32-bit KV
dtype it is just those elements. With ``fp8`` it is packed like FlashMLA's MLA row
(512 e4m3 + 4 fp32 scales + 64 bf16 RoPE = 656 bytes), generalised to every row kind:

``[ quantized elements (e4m3, 1 B each) | one fp32 scale per token per tile | plain elements (bf16) | pad ]``

* the *quantized* part is every state / K / V element: separate kinds quantize all of K and V,
  tied kinds (GTA, MLA, GLA) their state heads;
* the *plain* part is the shared RoPE key of the tied kinds (precision-sensitive: rotated,
  and small), kept in bf16;
* a *tile* is ``TILE`` (128) consecutive quantized channels, or the largest divisor of the head
  (state) width not above 128 when the width is not a multiple of 128, so a tile never
  straddles two heads; its scale is ``amax / 448`` (e4m3's largest finite value) of that token;
* the row is padded to a multiple of 16 bytes (none for the d_h = 128 presets: MLA 656 B).

:class:`RowFormat` is the one description of this layout: the planner reads its
``row_bytes``, the engine sizes its pools with it, the writer (:func:`quantize_rows`) packs it
and the decode kernels unpack it (``kvslim.kernels``), with :func:`dequantize_rows` as their
oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_DTYPES = ("bf16", "fp16", "fp32", "fp8")
TILE = 128
E4M3_MAX = 448.0
ROW_ALIGN = 16  # fp8 rows are padded to this many bytes
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def kv_dtype_name(dtype) -> str:
    """``bf16`` / ``fp16`` / ``fp32`` / ``fp8`` from a name or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        for k, v in _TORCH.items():
            if v == dtype:
                return k
        raise ValueError(f"unsupported KV dtype {dtype}")
    aliases = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "e4m3": "fp8", "fp8_e4m3": "fp8"}
    name = aliases.get(dtype, dtype)
    if name not in KV_DTYPES:
        raise ValueError(f"kv dtype must be one of {KV_DTYPES}, got {dtype!r}")
    return name


def _tile_for(width: int) -> int:
    """Largest multiple of 4 dividing ``width``, not above TILE (tiles never cross a head; 4-byte
    aligned scales)."""
    if width % TILE == 0:
        return TILE
    tiles = [t for t in range(4, min(width, TILE) + 1, 4) if width % t == 0]
    if not tiles:
        raise ValueError(f"fp8 KV needs head / state widths divisible by 4, got {width}")
    return max(tiles)


@dataclass(frozen=True)
class RowFormat:
    """Byte layout of a cache row.

    Attributes:
        kv_dtype: ``bf16``, ``fp16``, ``fp32`` or ``fp8``.
        row_dim: elements of the row (``quant + plain`` for fp8).
        quant: leading elements stored as e4m3 (fp8 only; 0 otherwise).
        plain: trailing elements stored in bf16 (fp8: the shared RoPE key; 0 otherwise).
        tile: quantized channels per scale (fp8 only).
    """

    kv_dtype: str
    row_dim: int
    quant: int = 0
    plain: int = 0
    tile: int = TILE

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_dtype", kv_dtype_name(self.kv_dtype))
        for name in ("row_dim", "quant", "plain", "tile"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"RowFormat.{name} must be an int >= 0, got {v!r}")
        if self.is_fp8:
            if self.quant + self.plain != self.row_dim:
                raise ValueError(f"RowFormat: quant {self.quant} + plain {self.plain} != row_dim {self.row_dim}")
            if self.tile < 4 or self.tile % 4 or self.quant % self.tile:
                raise ValueError(f"RowFormat.tile must be a multiple of 4 dividing quant={self.quant}, got {self.tile}")
        elif self.quant or self.plain:
            raise ValueError(f"RowFormat: quant/plain are fp8 fields, got them for {self.kv_dtype}")

    @classmethod
    def for_spec(cls, spec, kv_dtype: str = "bf16", tp_size: int = 1) -> RowFormat:
        """The row of one rank of ``spec`` (an ``AttentionSpec``) in ``kv_dtype``."""
        kv_dtype = kv_dtype_name(kv_dtype)
        row_dim = spec.row_dim_per_rank(tp_size)
        if kv_dtype != "fp8":
            return cls(kv_dtype, row_dim)
        plain = spec.rope_dim if spec.is_tied else 0
        width = spec.state_dim if spec.is_tied else spec.head_dim
        return cls("fp8", row_dim, quant=row_dim - plain, plain=plain, tile=_tile_for(width))

    @property
    def is_fp8(self) -> bool:
        return self.kv_dtype == "fp8"

    @property
    def num_scales(self) -> int:
        return self.quant // self.tile if self.is_fp8 else 0

    @property
    def scale_offset(self) -> int:
        """Byte offset of the fp32 scales in a row."""
        return self.quant

    @property
    def plain_offset(self) -> int:
        """Byte offset of the bf16 plain part in a row."""
        return self.quant + 4 * self.num_scales

    @property
    def row_bytes(self) -> int:
        """Bytes of one row; fp8 rows are padded to a multiple of 16 (aligned, vectorised loads)."""
        if self.is_fp8:
            return -(-(self.plain_offset + 2 * self.plain) // ROW_ALIGN) * ROW_ALIGN
        return self.row_dim * _ELEMENT_BYTES[self.kv_dtype]

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of the pool tensor: uint8 bytes for fp8, else the element dtype."""
        return torch.uint8 if self.is_fp8 else _TORCH[self.kv_dtype]

    @property
    def storage_width(self) -> int:
        """Last dimension of the pool tensor ``[num_pages, page_size, width]``."""
        return self.row_bytes if self.is_fp8 else self.row_dim

    def describe(self) -> str:
        if not self.is_fp8:
            return f"{self.kv_dtype}: {self.row_dim} x {_ELEMENT_BYTES[self.kv_dtype]} B = {self.row_bytes} B"
        return (f"fp8: {self.quant} e4m3 + {self.num_scales} fp32 scales (tiles of {self.tile})"
                + (f" + {self.plain} bf16" if self.plain else "") + f" = {self.row_bytes} B")


def quantize_rows(rows: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """Pack rows ``[..., row_dim]`` (any float dtype) into ``[..., row_bytes]`` uint8 (fp8 format).

    Per token per tile: ``scale = amax / 448`` (1 for an all-zero tile), values ``x / scale``
    rounded to e4m3 (saturating; every value is within range by construction).
    """
    if not fmt.is_fp8:
        raise ValueError(f"quantize_rows needs an fp8 RowFormat, got {fmt.kv_dtype}")
    if rows.shape[-1] != fmt.row_dim:
        raise ValueError(f"rows have {rows.shape[-1]} elements, the row format {fmt.row_dim}")
    lead = rows.shape[:-1]
    x = rows[..., : fmt.quant].float().reshape(*lead, fmt.num_scales, fmt.tile)
    amax = x.abs().amax(-1, keepdim=True)
    # a tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its reciprocal,
    # which is not the IEEE quotient the fused writer (kernels/write.py) computes
    scale = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX), torch.ones_like(amax))
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(*lead, fmt.quant)
    parts = [q.view(torch.uint8), scale.reshape(*lead, fmt.num_scales).contiguous().view(torch.uint8)]
    if fmt.plain:
        parts.append(rows[..., fmt.quant :].to(torch.bfloat16).contiguous().view(torch.uint8))
    pad = fmt.row_bytes - fmt.plain_offset - 2 * fmt.plain
    if pad:
        parts.append(torch.zeros(*lead, pad, dtype=torch.uint8, device=rows.device))
    return torch.cat(parts, -1)


def dequantize_rows(packed: torch.Tensor, fmt: RowFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack ``[..., row_bytes]`` uint8 rows into ``[..., row_dim]`` of ``dtype`` (the kernels' oracle)."""
    if not fmt.is_fp8:
        raise ValueError(f"dequantize_rows needs an fp8 RowFormat, got {fmt.kv_dtype}")
    if packed.dtype != torch.uint8 or packed.shape[-1] != fmt.row_bytes:
        raise ValueError(f"packed rows must be uint8 [..., {fmt.row_bytes}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    lead = packed.shape[:-1]
    p = packed.contiguous()
    q = p[..., : fmt.quant].view(torch.float8_e4m3fn).float().reshape(*lead, fmt.num_scales, fmt.tile)
    scale = p[..., fmt.scale_offset : fmt.plain_offset].contiguous().view(torch.float32)
    out = (q * scale[..., None]).reshape(*lead, fmt.quant)
    if fmt.plain:
        rope = p[..., fmt.plain_offset : fmt.plain_offset + 2 * fmt.plain].contiguous().view(torch.bfloat16).float()
        out = torch.cat([out, rope], -1)
    return out.to(dtype)


def roundtrip_rows(rows: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """What a cache in ``fmt`` gives back for ``rows`` (fp8: quantized then dequantized; else a cast)."""
    if fmt.is_fp8:
        return dequantize_rows(quantize_rows(rows, fmt), fmt, rows.dtype)
    return rows.to(fmt.storage_dtype).to(rows.dtype)
