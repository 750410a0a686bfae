"""Tensor I/O for streaming conversion: a lazy reader of a model directory and an incremental
``.safetensors`` writer, so neither side ever holds a whole model.

:class:`LazyCheckpoint` reads only the safetensors *headers* up front (names, shapes: the
checks of ``Transformer.from_pretrained``, with its messages) and then one group of tensors
at a time; each read opens the file with ``safe_open`` and closes it again, so the pages it
touched leave the process (a file kept mapped would count every layer read so far in RSS).

:class:`SafetensorsWriter` lays out one file for a known set of (name, dtype, shape), writes
the header at once and every tensor at its offset as it arrives (``pwrite``, any order). The
layout is the one ``safetensors.torch.save_file`` chooses (tensors sorted by dtype, widest
first, then by name; compact JSON header padded with spaces to 8 bytes), so a streamed file
is byte-identical to one saved from the whole state dict (tested).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from kvslim.checkpoint import FORMAT, read_config
from kvslim.model import ModelConfig, Transformer, config_from_hf, hf_rope_interleaved

__all__ = ["LazyCheckpoint", "SafetensorsWriter", "safetensors_layout"]

_EMB, _NORM, _HEAD, _PRE = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0."

# safetensors' Dtype enum position (its save sorts by it, descending) for the dtypes written here
_DTYPES = {torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12), torch.int32: ("I32", 13),
           torch.float32: ("F32", 15), torch.float64: ("F64", 16), torch.int64: ("I64", 17)}


def _unreadable(f: Path, e: Exception) -> ValueError:
    return ValueError(f"{f} ({f.stat().st_size:,} bytes) is not a readable safetensors file "
                      f"(corrupt or truncated?): {e}")


class LazyCheckpoint:
    """A model directory whose tensors are read on demand (float32, as ``from_pretrained(dtype=float32)``).

    Attributes:
        path: the directory; ``config``: its ``ModelConfig``; ``num_params``: elements of the
        model's state dict (tied ``lm_head`` counted, as ``state_dict()`` does).
    Raises:
        ValueError naming the file or tensor: no/unreadable safetensors, repeated, missing,
        unexpected or mis-shaped tensors.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        raw = read_config(self.path)
        self.config = (ModelConfig.from_dict({k: v for k, v in raw.items() if k != "format"})
                       if raw.get("format") == FORMAT else config_from_hf(raw))
        self.interleaved = hf_rope_interleaved(raw)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no .safetensors files in {self.path}")
        self._file: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    part = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
                raise _unreadable(f, e) from None
            dup = set(part) & set(shapes)
            if dup:
                raise ValueError(f"{f} repeats tensors of another file: {sorted(dup)[:3]}")
            shapes.update(part)
            self._file.update(dict.fromkeys(part, f))
        # expected names and shapes from a one-layer, one-token model (the meta device would import
        # torch._dynamo: +150 MB resident, more than a SmolLM2 layer)
        D, V, L = self.config.hidden_size, self.config.vocab_size, self.config.num_layers
        layer = {k[len(_PRE):]: tuple(v.shape) for k, v in self._shell().state_dict().items() if k.startswith(_PRE)}
        want = {f"model.layers.{i}.{k}": s for i in range(L) for k, s in layer.items()}
        want.update({_EMB: (V, D), _NORM: (D,), _HEAD: (V, D)})
        self.num_params = sum(math.prod(s) for s in want.values())  # lm_head counted even when tied, as state_dict
        if self.config.tie_word_embeddings:  # a tied checkpoint may still hold lm_head: it is not read
            want.pop(_HEAD)
            shapes.pop(_HEAD, None)
        missing = set(want) - set(shapes)
        unexpected = {k for k in set(shapes) - set(want) if not k.endswith("rotary_emb.inv_freq")}
        if missing or unexpected:
            raise ValueError(f"checkpoint {self.path} does not match the config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        bad = [f"{k} {shapes[k]} != {want[k]}" for k in sorted(want) if shapes[k] != want[k]]
        if bad:
            raise ValueError(f"checkpoint {self.path}: tensor shapes do not match config.json: {bad[:3]}")
        self.shapes = {k: shapes[k] for k in want}

    def tensors(self, names, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """``{name: float32 tensor}``, each file opened once for its names and closed again (``dtype=None``:
        as stored, e.g. half the memory of float32 for a bf16 source)."""
        from safetensors import safe_open

        out, by_file = {}, {}
        for n in names:
            by_file.setdefault(self._file[n], []).append(n)
        for f, group in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as h:
                    for n in group:
                        t = h.get_tensor(n)
                        out[n] = t if dtype is None else t.to(dtype)
            except Exception as e:  # noqa: BLE001
                raise _unreadable(f, e) from None
        return out

    def get(self, name: str) -> torch.Tensor | None:
        """One tensor (float32), or None if the checkpoint has no such tensor."""
        return self.tensors([name])[name] if name in self.shapes else None

    def _shell(self) -> Transformer:
        """A one-layer, one-token-vocabulary model of this config (float32, randomly initialised)."""
        cfg = ModelConfig(**{**self.config.to_dict(), "num_layers": 1, "vocab_size": 1})
        shell = Transformer(cfg)
        ends = {k for k in shell.state_dict() if not k.startswith(_PRE)}
        if ends != {_EMB, _NORM, _HEAD}:
            raise ValueError(f"internal: the model has tensors outside its layers that streaming does not know: {ends}")
        return shell

    def layer(self, i: int) -> Transformer:
        """A one-layer, one-token-vocabulary Transformer holding source layer ``i`` (float32).

        Its embeddings and final norm are placeholders: converters change attention only, so
        layer ``i`` of any conversion of the whole model is layer 0 of the same conversion of it.
        """
        if self.interleaved:
            raise ValueError("streaming reads grouped-attention sources; this is an interleaved-RoPE DeepSeek one")
        shell = self._shell()
        pre = f"model.layers.{i}."
        sd = {_PRE + k[len(pre):]: v for k, v in self.tensors([k for k in self.shapes if k.startswith(pre)]).items()}
        missing, unexpected = shell.load_state_dict(sd, strict=False, assign=True)  # placeholders stay
        if unexpected or set(missing) - {_EMB, _NORM, _HEAD}:
            raise ValueError(f"internal: layer {i} did not fill the shell: {sorted(missing)[:3]} {unexpected[:3]}")
        return shell.eval()


def safetensors_layout(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``(header bytes incl. its 8-byte length, {name: (start, end) byte offsets in the file})``."""
    for name, (dtype, _) in layout.items():
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not one the streaming writer handles")
    order = sorted(layout, key=lambda n: (-_DTYPES[layout[n][0]][1], n))
    head: dict = {"__metadata__": metadata} if metadata else {}
    offsets, pos = {}, 0
    for n in order:
        dtype, shape = layout[n]
        size = dtype.itemsize
        for s in shape:
            size *= s
        head[n] = {"dtype": _DTYPES[dtype][0], "shape": list(shape), "data_offsets": [pos, pos + size]}
        offsets[n] = (pos, pos + size)
        pos += size
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {n: (a + base, b + base) for n, (a, b) in offsets.items()}


class SafetensorsWriter:
    """One ``.safetensors`` file written tensor by tensor, in any order (module docstring).

    ``write(name, tensor)`` checks the tensor against the planned layout (dtype, shape, not yet
    written); ``close()`` raises unless every planned tensor was written.
    """

    def __init__(self, path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.layout = dict(layout)
        header, self.offsets = safetensors_layout(self.layout, metadata)
        end = max((b for _, b in self.offsets.values()), default=len(header))
        self.written: set[str] = set()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pwrite(header, 0)
        os.ftruncate(self.fd, end)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (CPU) at its offset."""
        if name not in self.layout:
            raise ValueError(f"internal: tensor {name!r} is not in the planned layout of {self.path.name}")
        if name in self.written:
            raise ValueError(f"internal: tensor {name!r} written twice")
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"internal: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the layout "
                             f"planned {dtype} {tuple(shape)}")
        if tensor.numel():
            self._pwrite(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                         self.offsets[name][0])
        self.written.add(name)

    def close(self) -> None:
        """Close the file; raises if a planned tensor was never written."""
        self.abort()
        missing = set(self.layout) - self.written
        if missing:
            raise ValueError(f"internal: {len(missing)} planned tensors were not written: {sorted(missing)[:3]}")

    def abort(self) -> None:
        """Close the file without checking it is complete (the caller discards it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
