"""Mixed precision the standard way: float32 master weights, compute in `model.dtype`, fp32 optimizer state.

`ModelConfig.dtype` names the *compute* dtype. For training, parameters (and so gradients and the optimizer state)
stay float32; forward and backward run under `torch.autocast(dtype=compute)`, and under FSDP2 its
`MixedPrecisionPolicy` gathers parameters in the compute dtype and reduces gradients in float32. Why: updating
bfloat16 weights in place loses every update smaller than half a bf16 ulp (measured: a [896, 896] weight of std
0.02, fused AdamW, 10 steps at lr 1e-6 changed 1.9 % of its elements at all; at 2e-5, 29 %).

float16 additionally needs a loss scale (`torch.amp.GradScaler`): its 5-bit exponent underflows small gradients.
The scale's state is part of the train state so that resume stays exact.

Checkpoints for consumers (`save_pretrained`) are written in the compute dtype (small, loadable as is); when that
is not float32, the float32 masters are written beside them (`MASTER_FILE`) and read back by `load_masters` for
resume and for the SFT→RL hand-off, so training continues from the exact weights it had.

Device-side accumulators use float64 except on MPS, which has no float64 (`accum_dtype`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

MASTER_FILE = "master_weights.safetensors"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    assert name in _DTYPES, f"unknown dtype {name}"
    return _DTYPES[name]


def is_mixed(name: str) -> bool:
    """True when compute runs in a lower precision than the float32 master weights."""
    return torch_dtype(name) != torch.float32


def accum_dtype(device: torch.device) -> torch.dtype:
    """The dtype for on-device sums and counters: float64 where the device has it (MPS does not)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def autocast(device: torch.device, name: str) -> contextlib.AbstractContextManager:
    """Autocast to the compute dtype; a no-op context for float32 (bitwise the same as no autocast)."""
    if not is_mixed(name):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype(name))


def grad_scaler(device: torch.device, name: str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for float16; None for float32/bfloat16 (their exponent range needs none)."""
    if torch_dtype(name) != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def fsdp_policy(name: str):
    """FSDP2's mixed-precision policy: gather parameters in the compute dtype, reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not is_mixed(name):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch_dtype(name), reduce_dtype=torch.float32)


def consumer_state_dict(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The weights consumers load, in the compute dtype (floating tensors only; integer buffers as they are)."""
    dtype = torch_dtype(name)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def distinct_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the keys whose tensor shares storage with an earlier key (tied embeddings / LM head)."""
    seen: set[tuple[int, int]] = set()
    kept = {}
    for key, value in state.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        kept[key] = value.detach().contiguous()
    return kept


def save_masters(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write the float32 master weights into a checkpoint directory being staged."""
    from safetensors.torch import save_file

    masters = {k: v.float() if v.is_floating_point() else v for k, v in distinct_tensors(state).items()}
    assert all(v.dtype != torch.bfloat16 and v.dtype != torch.float16 for v in masters.values())
    save_file({k: v.cpu() for k, v in masters.items()}, str(Path(directory) / MASTER_FILE))


def load_masters(model: nn.Module, directory: Path) -> bool:
    """Overwrite `model`'s weights with the float32 masters saved in `directory`, if there are any.

    Returns whether masters were found. Keys missing from the file must be tied to a loaded one.
    """
    from safetensors.torch import load_file

    file = Path(directory) / MASTER_FILE
    if not file.is_file():
        return False
    masters = load_file(str(file), device="cpu")
    missing, unexpected = model.load_state_dict(masters, strict=False)
    assert not unexpected, f"{file}: weights the model does not have: {unexpected[:5]}"
    tied = _tied_keys(model)
    assert set(missing) <= tied, f"{file}: missing weights that are not tied to saved ones: {sorted(set(missing) - tied)[:5]}"
    return True


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys whose tensor is the same object as another key's (e.g. lm_head.weight with tied embeddings)."""
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    return {key for keys in by_tensor.values() if len(keys) > 1 for key in keys}


def record_dtype(directory: Path, name: str) -> None:
    """Say in a saved `config.json` which dtype its weights are in (save_pretrained records the float32 masters')."""
    import json

    file = Path(directory) / "config.json"
    saved = json.loads(file.read_text())
    saved["dtype"] = name
    file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """loss.backward(), through the loss scale when there is one (float16)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def unscale(optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Divide the gradients by the loss scale (before measuring or clipping them); records overflow."""
    if scaler is not None:
        scaler.unscale_(optimizer)


def optimizer_step(optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """optimizer.step(); with a loss scale, GradScaler skips a step whose gradients overflowed and adapts the scale."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()
