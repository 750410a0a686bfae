"""Tensor parallelism for the engine (seed 000 §3.3): rank shards, leader/follower stepping.

Sharding a full model for rank ``r`` of ``N``:

* attention: the module's own shard (``cls(spec, tp_rank=r, tp_size=N)`` +
  ``cls.shard_state_dict``): GLA splits latent heads, GTA/GQA split groups, MLA
  replicates its latent; q/k/v are column-parallel, ``o_proj`` row-parallel + all-reduce;
* MLP: ``gate_proj``/``up_proj`` column-parallel (rows of the intermediate split N ways),
  ``down_proj`` row-parallel + all-reduce;
* embeddings, norms and ``lm_head``: replicated (every rank computes the same logits).

Stepping: the leader (rank 0) runs the scheduler and, before each forward, broadcasts
``(op, args)`` on a CPU (gloo) control group; followers replay the same forward on their
shard, so the all-reduces (NCCL on GPU, gloo on CPU) match up. :class:`TPSession` starts
the followers as local processes and is the ``tp`` object an ``LLMEngine`` takes.
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kvslim.attention import attention_class, build_attention
from kvslim.engine.source import ModelSource


class ParallelMLP(nn.Module):
    """SwiGLU MLP of one rank: column-parallel gate/up, row-parallel down, all-reduce."""

    def __init__(self, full: nn.Module, rank: int, size: int):
        super().__init__()
        inter = full.gate_proj.weight.shape[0]
        if inter % size:
            raise ValueError(f"intermediate_size={inter} must be divisible by tp={size}")
        n = inter // size
        sl = slice(rank * n, (rank + 1) * n)

        def col(lin):
            out = nn.Linear(lin.in_features, n, bias=lin.bias is not None)
            out.weight = nn.Parameter(lin.weight[sl].detach().clone())
            if lin.bias is not None:
                out.bias = nn.Parameter(lin.bias[sl].detach().clone())
            return out

        self.gate_proj, self.up_proj = col(full.gate_proj), col(full.up_proj)
        d = full.down_proj
        self.down_proj = nn.Linear(n, d.out_features, bias=d.bias is not None and rank == 0)
        self.down_proj.weight = nn.Parameter(d.weight[:, sl].detach().clone())
        if d.bias is not None and rank == 0:  # the bias is added once, by rank 0
            self.down_proj.bias = nn.Parameter(d.bias.detach().clone())
        self.process_group = None

    def forward(self, x):
        out = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.process_group is not None:
            dist.all_reduce(out, group=self.process_group)
        return out


def shard_model(full, rank: int, size: int, group=None):
    """Rank ``rank``'s shard of a full ``Transformer`` (the full model is not modified)."""
    full.config.attention.check_tp(size)
    shard = copy.copy(full)
    shard.__dict__ = dict(full.__dict__)
    shard._modules = dict(full._modules)
    backbone = copy.copy(full.model)
    backbone.__dict__ = dict(full.model.__dict__)
    backbone._modules = dict(full.model._modules)
    layers = nn.ModuleList()
    for i, layer in enumerate(full.model.layers):
        spec = full.config.layer_spec(i)  # per-layer latent ranks: each layer shards its own spec
        new = copy.copy(layer)
        new.__dict__ = dict(layer.__dict__)
        new._modules = dict(layer._modules)
        cls = attention_class(spec)
        attn = build_attention(spec, tp_rank=rank, tp_size=size).to(
            device=layer.self_attn.o_proj.weight.device, dtype=layer.self_attn.o_proj.weight.dtype)
        attn.load_state_dict(cls.shard_state_dict(layer.self_attn.state_dict(), spec, rank, size))
        attn.impl = layer.self_attn.impl
        if hasattr(attn, "absorb"):
            attn.absorb = layer.self_attn.absorb
        attn.process_group = group
        mlp = ParallelMLP(layer.mlp, rank, size)
        mlp.process_group = group
        new._modules["self_attn"], new._modules["mlp"] = attn, mlp
        layers.append(new)
    backbone._modules["layers"] = layers
    shard._modules["model"] = backbone
    return shard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(source_device: str, local_rank: int) -> torch.device:
    if source_device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(source_device)


def _init(rank: int, size: int, port: int, backend: str):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=120))
    ctrl = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return dist.group.WORLD, ctrl


def _follower_main(rank: int, size: int, port: int, backend: str, device: str, device_offset: int) -> None:
    """Entry of a follower process: build shards on request and replay the leader's forwards."""
    import signal

    from kvslim.engine.runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the leader; it stops us
    if device != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dev = _device_for(device, device_offset + rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    group, ctrl = _init(rank, size, port, backend)
    model = runner = None
    try:
        while True:
            msg = [None]
            dist.broadcast_object_list(msg, src=0, group=ctrl)
            op, args = msg[0]
            if op == "stop":
                break
            if op == "load":
                runner = None
                model = shard_model(args[0].build(dev), rank, size, group)
            elif op == "init":
                runner = ModelRunner(model, **args[0])
            elif op == "decode":
                runner.decode(*args)
            elif op == "prefill":
                runner.prefill(*args)
            elif op == "verify":
                runner.verify(*args)
    finally:
        dist.destroy_process_group()


class TPSession:
    """Leader side of a tensor-parallel group: this process is rank 0, followers are spawned.

    Args:
        size: tensor-parallel ranks N.
        device: ``cpu`` (gloo) or ``cuda`` (NCCL; rank r uses cuda:device_offset+r).
        device_offset: first GPU of this group (data-parallel replicas use disjoint GPUs).
    """

    def __init__(self, size: int, *, device: str = "cpu", device_offset: int = 0):
        if size < 2:
            raise ValueError(f"TPSession needs tp >= 2, got {size}")
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already initialised in this process")
        self.size, self.device = size, device
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.dev = _device_for(device, device_offset)
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
        else:  # the ranks share the host's cores: oversubscription slows every all-reduce
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        port = free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_follower_main, args=(r, size, port, self.backend, device, device_offset),
                                  daemon=True) for r in range(1, size)]
        for p in self.procs:
            p.start()
        self.group, self.ctrl = _init(0, size, port, self.backend)
        self.closed = False

    def send(self, op: str, *args) -> None:
        dist.broadcast_object_list([(op, args)], src=0, group=self.ctrl)

    def load(self, source: ModelSource):
        """Every rank builds ``source`` and keeps its shard; returns rank 0's shard."""
        self.send("load", source)
        return shard_model(source.build(self.dev), 0, self.size, self.group)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.send("stop")
        except RuntimeError:  # a follower is already gone
            pass
        finally:
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
            dist.destroy_process_group()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
