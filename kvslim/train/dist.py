"""Data-parallel training under ``torchrun``: FSDP2 sharding, batch slicing, rank-0 I/O.

``torchrun --nproc-per-node N -m kvslim finetune ...`` sets ``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK``; :func:`setup` reads them, checks the launch against the ``TrainConfig`` and
initialises the process group (NCCL on CUDA, gloo on CPU). Then:

* every decoder layer and the root are sharded with ``fully_shard`` (FSDP2): parameters,
  gradients and AdamW state are split over the ranks, a layer's weights are all-gathered
  only around its forward and backward;
* ``batch_size`` is the *global* batch: every rank draws the same windows (the generator is
  seeded by seed/step/micro only) and keeps its own ``batch_size / N`` rows
  (:func:`local_rows`), so the batch, the loss (a mean over equal slices, averaged by
  FSDP's gradient reduce-scatter) and the update are those of one process;
* rank 0 alone reads and writes checkpoints, logs and the model directory; state dicts are
  gathered to it in full (:func:`full_model_state`, :func:`full_optim_state`) in the same
  format as a single-process run, so either kind of run resumes the other's checkpoint.

``WORLD_SIZE`` 1 (or no torchrun) is the plain single-process loop; every helper here is then
the identity.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvslim.runtime import resolve_device


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the run: ``world`` ranks, this one ``rank``, on ``device``."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (torchrun sets it)") from None


def launch_from_env(cfg) -> Launch:
    """The launch described by torchrun's environment, validated against ``cfg``; changes nothing.

    Raises ValueError naming the field for: a global ``batch_size`` not divisible by the world
    size, an explicit ``cuda:N`` device (each rank uses ``cuda:LOCAL_RANK``), inconsistent
    ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = _env_int("LOCAL_RANK")
        local = rank % max(1, torch.cuda.device_count()) if local is None else local
    else:
        world = _env_int("WORLD_SIZE") or 1
        if world < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
        if world == 1:
            return Launch(device=resolve_device(cfg.device))
        rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
        for name, v in (("RANK", rank), ("LOCAL_RANK", local)):
            if v is None or not 0 <= v < world:
                raise ValueError(f"WORLD_SIZE={world} but {name}={v!r}: launch with torchrun, which sets both")
        if not dist.is_available():
            raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if cfg.batch_size % world:
        raise ValueError(
            f"TrainConfig.batch_size (--batch-size) is the global batch and must be divisible by the "
            f"world size WORLD_SIZE={world}, got {cfg.batch_size}"
        )
    dev = cfg.device
    if dev not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"TrainConfig.device (--device) must be auto, cpu or cuda under torchrun (rank r uses "
            f"cuda:LOCAL_RANK), got {dev!r}"
        )
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(f"cuda:{local}" if dev == "cuda" else "cpu")
    if device.type == "cuda" and local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
    return Launch(device=device, rank=rank, world=world, local_rank=local)


def setup(cfg) -> Launch:
    """:func:`launch_from_env`, then the process group (NCCL on CUDA, gloo on CPU) if not yet up."""
    launch = launch_from_env(cfg)
    if launch.sharded and not dist.is_initialized():
        if launch.device.type == "cuda":
            torch.cuda.set_device(launch.device)
        dist.init_process_group(
            "nccl" if launch.device.type == "cuda" else "gloo",
            **({"device_id": launch.device} if launch.device.type == "cuda" else {}),
        )
        # destroyed before interpreter teardown: a group left to die with the process can abort it
        # ("terminate called without an active exception" from gloo's threads, seen in CI)
        atexit.register(shutdown)
    return launch


def is_main() -> bool:
    """Whether this process is rank 0 of a started process group, or runs alone."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown() -> None:
    """Destroy the process group (end of a command); a no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model, launch: Launch):
    """Shard ``model`` in place with FSDP2: each decoder layer, then the root (embeddings, final
    norm, LM head; a tied LM head stays one parameter). Rank 0's weights are broadcast first, so
    the ranks start from one model even if they built or loaded it differently."""
    if not launch.sharded:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(launch.device.type, (launch.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_rows(t: torch.Tensor, launch: Launch) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (rows ``rank*b : (rank+1)*b``)."""
    if not launch.sharded:
        return t
    b = t.shape[0] // launch.world
    return t[launch.rank * b : (launch.rank + 1) * b]


def mean_over_ranks(t: torch.Tensor, launch: Launch) -> torch.Tensor:
    """The mean of ``t`` over the ranks (a new tensor; gloo has no AVG, so SUM / N)."""
    if not launch.sharded:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / launch.world


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (a norm computed over sharded gradients) or a tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def on_rank0(fn, launch: Launch, *, share: bool = True):
    """Run ``fn`` on rank 0 only; its result (``share``) or its error reaches every rank.

    A ValueError on rank 0 is raised on every rank with the same message (so a bad checkpoint or
    ``--out`` stops all ranks instead of leaving them waiting at the next collective).
    """
    if not launch.sharded:
        return fn()
    box: list = [None]
    out = None
    if launch.main:
        try:
            out = fn()
            box[0] = ("ok", out if share else None)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("err", type(e).__name__, str(e))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "err":
        raise (ValueError if box[0][1] == "ValueError" else RuntimeError)(box[0][2])
    return out if launch.main else box[0][1]


def rank0_first(fn, launch: Launch):
    """``fn()`` on rank 0, then on the others (so a download or cache fill happens once, and an
    error on rank 0 is raised everywhere)."""
    out = on_rank0(fn, launch, share=False)
    return out if launch.main else fn()


def barrier(launch: Launch) -> None:
    if launch.sharded:
        dist.barrier()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model, launch: Launch) -> dict:
    """``model.state_dict()`` with full tensors: all ranks call it, rank 0 gets the tensors (on CPU),
    the others ``{}``."""
    if not launch.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def _fqns(model, opt) -> list[list[str]]:
    """Parameter names of each optimizer param group, in the group's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def full_optim_state(model, opt, launch: Launch) -> dict:
    """``opt.state_dict()`` as one process would write it (state keyed by parameter index), gathered
    in full to rank 0 (the others get ``{}``); all ranks call it."""
    if not launch.sharded:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    if not launch.main:
        return {}
    index = {n: i for i, n in enumerate(n for g in _fqns(model, opt) for n in g)}
    return {
        "state": {index[n]: s for n, s in osd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]],
    }


def load_full_state(model, opt, model_state: dict | None, optim_state: dict | None, launch: Launch) -> None:
    """Load full (single-process format) model and optimizer state dicts; under sharding rank 0
    holds them and broadcasts each tensor to the shards (the other ranks pass None)."""
    if not launch.sharded:
        model.load_state_dict(model_state)
        opt.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state if launch.main else {}, options=_options(broadcast_from_rank0=True))
    osd = {}
    if launch.main:
        fqn = [n for g in _fqns(model, opt) for n in g]
        osd = {
            "state": {fqn[i]: s for i, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in optim_state["param_groups"]],
        }
    set_optimizer_state_dict(model, opt, osd, options=_options(broadcast_from_rank0=True))
