"""Sequential (error-propagating) calibration: fit each layer on the converted model's own activations.

The ``original`` pass (calib.py, stream.py) calibrates every layer on the *source* model's
activations: layer i's moment ``Σ_i = E[x̃x̃ᵀ]`` is that of the source's attention input. The
converted model, though, feeds layer i the output of its converted layers ``0..i-1``, whose errors
shift that distribution. ``calib_pass="sequential"`` converts layer by layer, as GPTQ and SparseGPT
quantise: convert layer 0, run the calibration windows through the *converted* layer 0, take
``Σ_1`` there, convert layer 1, and so on. ``Σ_i`` is then exactly the attention-input moment of the
final converted model (tested), so every fit weights its errors by the inputs the layer will see.

**The target.** Every fit reads one moment per layer and minimises
``E‖M^{1/2}(Z x̃ - up·down·x̃)‖²``, where ``Z x̃`` are the *source* layer's keys and values and, for
``fit="output"``, ``M`` weights key errors by the source queries' second moment ``W_q Σ W_qᵀ`` and
value errors by ``o_proj`` (latent.py step 3'). With ``Σ`` from the converted inputs, converted layer
i is fit to mimic *original layer i on the inputs it will actually see*: the right target, for
three reasons. (1) It is what the layer computes at serving time: its queries, keys and values all
read the converted stream. (2) The other candidate, the original layer's outputs on the *original*
inputs (``E‖Z x̃_src - up·down·x̃_conv‖²``, a reduced-rank regression on the cross moment), asks the
attention layer to undo upstream errors through its own keys and values; but those errors live in
the residual stream, to which attention only adds, and the regression is a ``[rows, D+1]`` map
fitted on the calibration windows, a risk on held-out genres. (3) One moment per layer keeps every
converter (latent.py, gqa_to_gta.py, both fits) unchanged, and exact at full rank.

**Cost.** The same walk as streaming (stream.py ``_walk``), with the forward through the converted
layer instead of the source's: no extra pass, the same peak memory (one layer + the calibration
hidden states). An in-memory model is walked the same way (:class:`ModelLayers`), so streaming and
in-memory sequential conversions are byte-identical. Per-layer ranks (``rank_alloc`` energy or
relative) are allocated on a first, original pass (ranks.py needs every layer's spectrum before
converting any), then the layers are converted sequentially with those ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvslim.convert.common import new_model
from kvslim.convert.stream import stream_layers
from kvslim.model import ModelConfig, Transformer

__all__ = ["CALIB_PASSES", "ModelLayers", "check_calib_pass", "convert_layerwise"]

CALIB_PASSES = ("original", "sequential")


def check_calib_pass(calib_pass, to: str) -> None:
    """Raise ValueError naming ``calib_pass`` unless it is one of :data:`CALIB_PASSES` and applies to ``to``."""
    if calib_pass not in CALIB_PASSES:
        raise ValueError(f"calib_pass must be one of {CALIB_PASSES}, got {calib_pass!r}")
    if calib_pass == "sequential" and to == "gqa":
        raise ValueError("calib_pass='sequential' applies to mla, gla and gta (the targets that calibrate); "
                         "--to gqa mean-pools without calibration")


class ModelLayers:
    """An in-memory Transformer read the way stream.py reads a checkpoint (``config``, ``layer(i)``,
    ``tensors(names)``): one-layer models around its layers, which are shared, not copied."""

    def __init__(self, model: Transformer):
        self.model, self.config = model, model.config

    def tensors(self, names) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in names}

    def layer(self, i: int) -> Transformer:
        """A one-layer, one-token-vocabulary Transformer whose layer 0 *is* layer ``i`` of the model."""
        dtype = next(self.model.parameters()).dtype
        shell = Transformer(ModelConfig(**{**self.config.to_dict(), "num_layers": 1, "vocab_size": 1})).to(dtype)
        shell.model.layers[0] = self.model.model.layers[i]
        return shell.eval()


@torch.no_grad()
def convert_layerwise(model: Transformer, calib: torch.Tensor, convert_layer: Callable, *,
                       progress: bool = True, sequential: bool = True,
                       refit: Callable | None = None) -> tuple[Transformer, dict]:
    """Convert an in-memory ``model`` layer by layer, each layer calibrated on the converted layers before it
    (``sequential=False``: on the source's, as the in-memory pass; the walk a refit needs, refit.py).

    Args:
        model: the source kvslim Transformer (left unchanged).
        calib: ``[N, T]`` int64 calibration windows (checked by the caller).
        convert_layer: ``fn(i, one-layer model, [moment]) -> (converted one-layer model, stats)``, the
            converter stream.py applies (pipeline.py).
        refit: ``refit(source layer, converted layer, inputs) -> stats`` applied to each converted layer
            (stream.py ``_walk``).
    Returns:
        ``(converted model, stats)``; per-layer stats lists concatenated over layers, as streaming does.
    """
    layers = stream_layers(ModelLayers(model), calib, convert_layer, sequential=sequential, progress=progress,
                           refit=refit)
    first = layers[0][0].spec
    ranks = [new.spec.latent_dim for new, _ in layers] if first.is_latent else None
    per_layer = ranks is not None and len(set(ranks)) > 1
    out = new_model(model, first.replace(latent_dim=max(ranks)) if per_layer else first, ranks if per_layer else None)
    stats: dict = {}
    for i in range(len(layers)):
        new, st = layers[i]
        layers[i] = None  # free each converted one-layer model once copied
        out.model.layers[i].load_state_dict(new.model.layers[0].state_dict())
        for k, v in st.items():
            stats.setdefault(k, []).extend(v)
    return out, stats
