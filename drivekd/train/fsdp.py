"""A sharded student (`train.distributed: fsdp`), on PyTorch's FSDP2 (`fully_shard`).

Each language-model layer is one FSDP unit and the rest of the model (vision tower, projector,
embeddings, head, final norm) the root unit (`VLMBackend.fsdp_units` says why): a rank holds 1/N of every parameter, of its gradient and of the
optimiser state, and gathers a layer's weights only while the layer runs. After a backward, a
parameter's `.grad` is this rank's shard of the gradient averaged over the ranks (FSDP's
reduce-scatter), so everything that reads gradients works on shards: the gradient combiner's Gram
matrix (partial k x k products, summed over the ranks), clipping (squared norms summed over the
ranks) and checkpoints (torch.distributed.checkpoint, each rank writing its shards).

Parameters trained beside the model (hidden-state projection heads) stay whole on every rank, as
under DDP. Whether a parameter is sharded is read off the parameter itself (a DTensor), so no flag
travels through the code.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from drivekd.errors import DriveKDError


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor; a whole tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def as_gradient_of(parameter: torch.Tensor, local_part: torch.Tensor) -> torch.Tensor:
    """A gradient for `parameter` made of this rank's part (the parameter's own sharding)."""
    if not isinstance(parameter, DTensor):
        return local_part
    return DTensor.from_local(
        local_part, parameter.device_mesh, parameter.placements, shape=parameter.shape, stride=parameter.stride()
    )


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; a single process (`drivekd distill` without torchrun) gets one of
    its own, so one config runs on one GPU and on many."""
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(minutes=30)
    )


def shard(model: torch.nn.Module, units: Iterable[torch.nn.Module], device: torch.device, mixed_precision: str) -> None:
    """Shard `model` in place: each of `units` its own unit, the rest the root unit. With bf16 the
    gathered weights compute in bf16 and gradients are reduced in fp32 (the sharded master weights and
    optimiser state stay in the weights' dtype)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    # the root too is released after its forward (FSDP keeps it gathered by default): while gathered,
    # `model.parameters()` yields the gathered copies, and whatever reads parameters between the forward
    # and the backward (the gradient combiner) must see the sharded ones that receive the gradients
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of sharded and whole parameters to one global norm (the norm of the full,
    unsharded gradient: shards' squared norms summed over the ranks, whole ones counted once)."""
    grads = [p.grad for p in params if p.grad is not None]
    device = local(grads[0]).device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        squared = local(g).double().pow(2).sum()
        if is_sharded(g):
            sharded += squared
        else:
            whole += squared
    total = float((sum_over_ranks(sharded) + whole).sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            local(g).mul_(scale)
    return total


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded model of `model`'s own class holding `state` (the gathered weights), made without
    allocating new weights, to be saved in HF format."""
    from torch.distributed.fsdp import FSDPModule

    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class(model.config)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    missing = [name for name, t in plain.named_parameters() if t.is_meta]  # buffers not saved may stay empty
    if missing:
        raise DriveKDError(f"gathering the sharded model for saving left {missing[:3]} without values")
    plain.generation_config = model.generation_config
    return plain


def _trained(model: torch.nn.Module, extra: torch.nn.Module | None) -> torch.nn.Module:
    """Everything the optimiser steps, under one module, so each of its parameters has a name (the
    projection heads trained beside the model, whole on every rank, included)."""
    parts = {"model": model}
    if extra is not None and any(True for _ in extra.parameters()):
        parts["extra"] = extra
    return torch.nn.ModuleDict(parts)


def save_sharded(
    model: torch.nn.Module, extra: torch.nn.Module | None, optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    """Weights and optimiser state, each rank writing its own shards into `folder` (every rank calls
    it); whole tensors (the projection heads and their state) are written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(_trained(model, extra), optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(
    model: torch.nn.Module, extra: torch.nn.Module | None, optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / ".metadata").is_file():
        raise DriveKDError(
            f"{folder}: not a sharded checkpoint (no .metadata); was it written with train.distributed: fsdp?"
        )
    trained = _trained(model, extra)
    model_state, optimizer_state = get_state_dict(trained, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def check_sharded(model: torch.nn.Module) -> None:
    """Between a forward and its backward every parameter of a sharded model must be its shard: the
    gradient combiner reads the parameters there, and a gathered copy would take its gradient in the
    shard's place. A torch whose FSDP keeps the root unit gathered after its forward fails here rather
    than combine the wrong gradients."""
    gathered = [name for name, p in model.named_parameters() if not is_sharded(p)]
    if gathered:
        raise DriveKDError(
            f"FSDP kept {len(gathered)} parameters gathered after the forward (e.g. {gathered[0]}); this torch "
            f"({torch.__version__}) does not release the root unit, which train.distributed: fsdp needs"
        )


def broadcast_path(path: Path | None) -> Path:
    """Rank 0's path on every rank (e.g. the temporary folder a checkpoint is written into)."""
    box = [str(path) if path is not None else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])  # type: ignore[arg-type]
