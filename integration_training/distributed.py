"""Process group, rank/world, sharding helpers, reductions and model wrapping.

One code path from one CPU process to N nodes: a single process is simply `world_size == 1`, and every helper here
is then a no-op (no process group is created). Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) describes the job; `init_distributed` reads it and joins the group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from integration_training.config import TargetConfig, world_size as configured_world_size
from integration_training.errors import UserError

T = TypeVar("T")

# How long a collective may wait for the slowest rank before the run fails instead of hanging. The longest
# legitimate wait is the other ranks in `barrier` while rank 0 alone writes a checkpoint: a 7B model with AdamW
# state is ~110 GB, ~18 min at 100 MB/s; 60 minutes leaves 3x that, and a dead or hung peer is reported within the
# hour (NCCL's default of 10 minutes would kill such a save; gloo's 30 minutes too).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the only process that writes files, logs metrics and shows progress


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def _device_for(target: TargetConfig, local_rank: int) -> torch.device:
    if target.device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("target.device_type: 'cuda' requested but no CUDA device is visible; use 'cpu'")
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"target.gpu_ranks: process {local_rank} needs GPU {local_rank} but only "
                f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})"
            )
        return torch.device("cuda", local_rank)
    if target.device_type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("target.device_type: 'mps' requested but MPS is not available; use 'cpu'")
        return torch.device("mps")
    assert target.device_type == "cpu", f"unknown device_type {target.device_type}"
    return torch.device("cpu")


def init_distributed(target: TargetConfig) -> Dist:
    """Join the process group described by torchrun's environment, or run as a single process.

    Idempotent: a second call (SFT then RL in one process) reuses the existing group.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    expected = configured_world_size(target)
    if world != expected:
        raise UserError(
            f"target.processes_per_node × num_nodes = {expected} processes, but this process was started with "
            f"WORLD_SIZE={world}; launch through deploy.py, which starts torchrun with the right size"
        )
    assert 0 <= rank < world and 0 <= local_rank <= rank, f"inconsistent RANK={rank} LOCAL_RANK={local_rank}"
    device = _device_for(target, local_rank)
    if world > 1 and not torch_dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device, is_main=rank == 0)


def resolve_master_addr(master_addr: str, master_port: int) -> int:
    """The address family of master_addr; an unresolvable name is a UserError naming target.master_addr."""
    import socket

    try:
        return socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as error:
        raise UserError(
            f"target.master_addr: {master_addr!r} cannot be resolved ({error}); write node 0's host name or IP "
            "('127.0.0.1' for one node)"
        ) from None


def check_port_free(master_addr: str, master_port: int) -> None:
    """Refuse a rendezvous port that something on this machine already listens on (a stale run, another job).

    The address must resolve (every node checks; an unresolvable name is a UserError naming target.master_addr).
    Binding is only checked for addresses this machine owns; a remote master_addr cannot be probed from here.
    """
    import errno
    import socket

    family = resolve_master_addr(master_addr, master_port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As torch's TCPStore does: a port whose old connections linger in TIME_WAIT (the previous run) is free;
        # only a socket that still listens on it makes the bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((master_addr, master_port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(
                    f"target.master_port: {master_addr}:{master_port} is already in use (another run?); "
                    "pick a free port or stop the other process"
                ) from error
            if error.errno == errno.EACCES:
                raise UserError(
                    f"target.master_port: this user may not bind {master_addr}:{master_port} (ports below 1024 need "
                    "root); pick a port in 1024-65535"
                ) from error
            if error.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL):
                raise UserError(f"target.master_port: cannot bind {master_addr}:{master_port} ({error})") from error


def destroy_distributed(dist: Dist) -> None:
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shard(items: Sequence[T], dist: Dist) -> list[T]:
    """This rank's disjoint slice (round-robin); the tail that would make ranks unequal is dropped.

    Every rank gets exactly `len(items) // world_size` items so that collective calls stay in lock-step.
    """
    usable = (len(items) // dist.world_size) * dist.world_size
    return list(items[:usable][dist.rank :: dist.world_size])


def all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (identity for one process)."""
    if dist.world_size > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world_size > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool, dist: Dist) -> bool:
    """True when `flag` is true on any rank; all ranks get the same answer (e.g. a stop request)."""
    value = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    return bool(all_reduce_max(value, dist).item() > 0)


def all_gather_objects(items: list[T], dist: Dist) -> list[T]:
    """Every rank's `items` concatenated in rank order (lists may differ in length); identity for one process."""
    if dist.world_size == 1:
        return list(items)
    gathered: list = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def wrap_model(model: nn.Module, target: TargetConfig, dist: Dist, dtype: str) -> nn.Module:
    """Wrap for data parallelism: DDP, FSDP2 (`fully_shard` per decoder layer, then the root), or nothing.

    Pass the module whose `forward` computes the loss: DDP only synchronises gradients of parameters used in a
    forward that went through the wrapper. `dtype` is the compute dtype: FSDP2 gathers parameters in it and
    reduces gradients in float32 (`precision.fsdp_policy`); DDP reduces the float32 master gradients.
    """
    if target.parallelism == "none" or dist.world_size == 1:
        return model
    if target.parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    assert target.parallelism == "fsdp2", f"unknown parallelism {target.parallelism}"
    from torch.distributed.fsdp import fully_shard

    from integration_training.precision import fsdp_policy

    policy = fsdp_policy(dtype)
    # Shard each transformer block separately so that only one block is gathered at a time.
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / torch.compile wrapper (FSDP2 shards in place, so it is returned as is)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(inner, "module", inner)  # DDP


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (sync only on the last one)."""
    if enabled:
        yield
        return
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "no_sync"):  # DDP
        with inner.no_sync():
            yield
    elif hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------------------------------------- FSDP2 state


def is_sharded(target: TargetConfig, dist: Dist) -> bool:
    """True when parameters (and optimizer state) are FSDP2 shards, so checkpoints must gather them first."""
    return target.parallelism == "fsdp2" and dist.world_size > 1


def full_model_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) state dict on rank 0 (CPU); other ranks get {}. Call on every rank.

    `prefix` is stripped from the keys (the HF model's name inside the wrapping loss module, e.g. "model.").
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key.removeprefix(prefix): value for key, value in state.items()}


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state gathered to rank 0 (CPU), keyed by parameter name. Call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`: rank 0 passes the loaded state, other ranks {}; rank 0 broadcasts it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)


# ---------------------------------------------------------------------------------------------------- lockstep


class LockstepModel:
    """A sharded (FSDP2) model whose forward calls stay paired across ranks, however many each rank makes.

    Every FSDP2 forward all-gathers the parameters, so all ranks must call forward equally often. Generation does
    not: a rank whose rows all stop early makes fewer decode calls, and uneven eval shards make fewer chunks.
    Each real forward first all-reduces an "I am computing" flag; `drain()` (called by every rank when its own
    work is done) keeps running a 1-token dummy forward while any other rank still computes, and returns once
    every rank is draining. Everything else (`parameters()`, `training`, `eval()`, ...) is the model's own.
    """

    def __init__(self, model: nn.Module, dist: Dist) -> None:
        self.model = model
        self.dist = dist
        self.forward_calls = 0  # real forwards of this rank (tests check the pairing)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        any_rank(True, self.dist)  # pairs with the other ranks' flag: a real or a dummy forward follows
        self.forward_calls += 1
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        # FSDP2 allocates its all-gather buffers on first use and reuses them in training; buffers made under
        # inference_mode could never be written again, so sampling runs the model under no_grad instead.
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.model(*args, **kwargs)
        return self.model(*args, **kwargs)

    def drain(self) -> int:
        """Pair the other ranks' remaining forwards with dummy ones; return how many dummies this rank ran."""
        dummies = 0
        device = next(self.model.parameters()).device
        while any_rank(False, self.dist):
            with torch.no_grad():
                self._forward(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
            dummies += 1
        return dummies


@contextlib.contextmanager
def lockstep(model: nn.Module, target: TargetConfig, dist: Dist) -> Iterator[nn.Module]:
    """Yield what to generate/evaluate with: a `LockstepModel` when parameters are FSDP2 shards, else `model`.

    Only the forward calls made through the yielded object are paired; on leaving, this rank drains. On an
    exception the rank does not drain: it is about to exit, and torchrun then stops the others.
    """
    if not is_sharded(target, dist):
        yield model
        return
    proxy = LockstepModel(model, dist)
    yield proxy  # type: ignore[misc]
    proxy.drain()
