"""LoRA adapters (peft) for SFT and RL: attach, reference model for free, checkpoint layout, merged export.

How the stages use it (`model.lora` set; `None` leaves every path below unused):
- `prepare(model, model_config, resume_from, seed)` right after the HF model loads and before it is wrapped or the
  optimizer is built: injects fresh adapters (or the ones saved in `resume_from`), freezes the base. The HF model
  object keeps its class and is trained as before — the adapters sit inside its linear layers — so the loss, the
  DDP/FSDP2 wrapping and the optimizer's grouping (which takes `requires_grad` parameters only) are unchanged.
- adapter weights are float32 whatever `model.dtype` is (an optimizer update far below a bf16 ulp of the weight
  would otherwise be lost); the frozen base stays in whatever dtype it was loaded in.
- `Adapters.reference()` is the RL reference model: the same modules with the adapters switched off (peft's
  `disable_adapter`), so a KL term costs no second copy of the weights.
- sampling (RL rollouts and RL's evaluations) runs with the adapters merged: `merged_for_sampling(model)`. Decoding
  with unmerged adapters pays two extra small matmuls per adapted linear layer per token: one RL rollout of
  configs/03_offline_lora.py measured 1.12x slower unmerged than merged (merge included; benchmarks/bench_lora.py,
  BENCHMARKS.md), and the merged weights are bit for bit the final export's, so RL samples what it exports. peft merges each layer with `safe_merge=True`, which writes
  the merged weight into a new tensor; the original base tensor is held aside and put back after peft's unmerge,
  so the frozen base is the very same tensor, bit for bit, after every rollout (an in-place merge/unmerge would
  round: (W + Δ) − Δ ≠ W in float). The merged tensors live only while sampling. FSDP2 shards sample unmerged.

Checkpoint layout of a LoRA run (`Adapters.writer(final)` is what `checkpoint.save_checkpoint` gets as the model):
    step_NNNNNN/adapter/        adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained(base, it)
    step_NNNNNN/train_state.pt  as for a full fine-tune; tokenizer files as well
    step_NNNNNN/config.json, model.safetensors   final step of a stage only: base + adapters merged, a plain model
                                                 for AutoModelForCausalLM.from_pretrained (evaluation, chat, RL)
The adapter lives in a sub-directory so that transformers never mistakes the final directory for an adapter repo.

SFT → RL: RL starts from SFT's final checkpoint (the merged model) as its base, with fresh adapters. So RL's
reference model (adapters off) is exactly the SFT model, as in a full fine-tune, and the RL adapter holds the RL
change alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from integration_training.config import LORA_ALL_LINEAR, LoRAConfig
from integration_training.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"  # peft's name for the single adapter
_LORA_KEY_PARTS = (".lora_A.", ".lora_B.")
_BASE_LAYER = ".base_layer."


def adapter_dir(step_dir: Path) -> Path:
    return Path(step_dir) / ADAPTER_DIR


# ---------------------------------------------------------------------------------------------------- targets


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a target given by name: the module's full name is the target or ends with '.target'."""
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """Full names of the linear modules that get adapters; UserError naming a target that matches none.

    "all-linear" = every nn.Linear except the output layer (the LM head), as peft defines it. The LM head is never
    adapted: it is often tied to the input embedding, which a merged export could not then represent.
    """
    head = model.get_output_embeddings()
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head}
    head_names = {name for name, module in model.named_modules() if module is head and head is not None}
    if lora.target_modules == [LORA_ALL_LINEAR]:
        assert linear, f"{type(model).__name__} has no linear layer besides the LM head"
        return sorted(linear)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    chosen: set[str] = set()
    for target in lora.target_modules:
        if any(_matches(name, target) for name in head_names):
            raise UserError(
                f"model.lora.target_modules: {target!r} is the output layer (LM head); LoRA here adapts the hidden "
                f"linear layers only. Linear layers of {type(model).__name__}: {', '.join(leaves)}"
            )
        found = {name for name, module in model.named_modules() if _matches(name, target)}
        if not found:
            raise UserError(
                f"model.lora.target_modules: {target!r} matches no module of {type(model).__name__}; its linear "
                f"layers are {', '.join(leaves)} (or use [{LORA_ALL_LINEAR!r}])"
            )
        not_linear = sorted(found - linear)
        if not_linear:
            raise UserError(
                f"model.lora.target_modules: {target!r} matches {not_linear[0]}, which is not a linear layer; "
                f"name linear layers ({', '.join(leaves)})"
            )
        chosen |= found
    return sorted(chosen)


def peft_config(lora: LoRAConfig, targets: list[str]):
    """The peft LoraConfig for `lora`, with the targets resolved to full module names (what the adapter records)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # Full names, anchored: peft then adapts exactly these modules and nothing it would match by suffix.
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=True,  # A ~ Kaiming-uniform, B = 0: training starts exactly at the base model
    )


# ---------------------------------------------------------------------------------------------------- attach


@dataclasses.dataclass(frozen=True)
class Adapters:
    """A model with LoRA adapters: `peft_model` wraps `model` (the HF model, adapters injected in place)."""

    peft_model: nn.Module  # peft.PeftModelForCausalLM; saves the adapter, switches it off
    model: nn.Module  # the HF model the stages train and sample with

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reference(self) -> "AdaptersOff":
        return AdaptersOff(self)

    def writer(self, final: bool, dtype: str) -> "CheckpointWriter":
        return CheckpointWriter(self, final, dtype)

    def scalings(self) -> dict[str, float]:
        """Module name (in the HF model) → the adapter's scale alpha / r, for every adapted layer."""
        from peft.tuners.lora import LoraLayer

        return {name: float(module.scaling[ADAPTER_NAME]) for name, module in self.model.named_modules()
                if isinstance(module, LoraLayer)}


def prepare(model: nn.Module, model_config, resume_from: Path | None, seed: int) -> Adapters | None:
    """Attach adapters to a freshly loaded HF model (before wrapping and before the optimizer); None for full FT.

    `resume_from`: a checkpoint step directory of this stage whose adapter is loaded (trainable) instead of fresh
    ones. Fresh adapters are drawn from `seed` without touching the global RNG, so every rank of a multi-process
    run, and a single process, start from the same adapter.
    """
    lora = model_config.lora
    if lora is None:
        return None
    from peft import PeftModel, get_peft_model

    targets = resolve_targets(model, lora)
    if resume_from is not None:
        source = adapter_dir(resume_from)
        if not (source / "adapter_config.json").is_file():
            raise UserError(
                f"{resume_from}: no LoRA adapter in {source}; this checkpoint was not written with model.lora set — "
                "resume with the config it was trained with"
            )
        peft_model = PeftModel.from_pretrained(model, str(source), is_trainable=True)
        saved = sorted(peft_model.peft_config[ADAPTER_NAME].target_modules)
        if saved != targets:
            raise UserError(f"{source}: adapts {len(saved)} modules, model.lora.target_modules now gives "
                            f"{len(targets)}; resume with the config the run started with")
    else:
        device = next(model.parameters()).device  # peft creates the adapters on the base layer's device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, peft_config(lora, targets))
    assert peft_model.get_base_model() is model, "peft must inject the adapters into the model in place"
    for name, param in model.named_parameters():
        is_adapter = any(part in f".{name}" for part in _LORA_KEY_PARTS)
        assert param.requires_grad == is_adapter, f"{name}: requires_grad={param.requires_grad}"
        if is_adapter and param.dtype != torch.float32:
            param.data = param.data.float()  # see the module docstring: adapters are float32 whatever the base
    # Gradient checkpointing with a frozen embedding: reentrant checkpointing would drop the adapters' gradients as
    # nothing entering a block requires grad; transformers' gradient_checkpointing_enable already hooks the embedding
    # output to require grad (tested with reentrant checkpointing in tests/test_lora.py).
    trainable, total = counts(model)
    logger.info("LoRA r=%d alpha=%g on %d modules (%s): %d trainable of %d parameters (%.2f%%)%s", lora.r, lora.alpha,
                len(targets), ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets})), trainable, total,
                100 * trainable / total, f"; adapter resumed from {resume_from}" if resume_from else "")
    return Adapters(peft_model=peft_model, model=model)


def counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model (tied tensors once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- reference


class AdaptersOff:
    """The RL reference model: calling it runs the policy's own modules with every adapter switched off.

    Only called under `torch.no_grad()` (reference log-probs). Everything but the call is the HF model's own.
    """

    def __init__(self, adapters: Adapters) -> None:
        self.adapters = adapters

    def __getattr__(self, name: str):
        return getattr(self.adapters.model, name)

    def __call__(self, *args, **kwargs):
        assert not torch.is_grad_enabled(), "the reference model runs without gradients"
        with self.adapters.peft_model.disable_adapter():
            return self.adapters.model(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def merged_for_sampling(model: nn.Module, sharded: bool) -> Iterator[None]:
    """Within the block, every adapter of `model` is merged into its layer's weight (a forward is then a plain
    linear layer's); on leaving, each base weight is the very tensor it was before, bit for bit, and the adapters
    are live again for training. No-op for a model without adapters (full fine-tune) or with FSDP2 shards
    (`sharded`: merging DTensor shards would gather them; they sample unmerged).

    Only for sampling: nothing may train inside the block (the adapters' gradients would not reach the output).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or sharded:
        yield
        return
    assert not any(layer.merged for layer in layers), "adapters already merged: merged_for_sampling is not reentrant"
    originals = [layer.get_base_layer().weight.data for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                # safe_merge: peft computes W + Δ into a new tensor (and refuses a non-finite result) instead of
                # adding Δ into W in place, so `originals` stay untouched.
                layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        yield
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, originals, strict=True):
                if layer.merged:
                    layer.unmerge()  # peft's bookkeeping (the adapter is live again); its arithmetic is discarded:
                layer.get_base_layer().weight.data = original  # the untouched tensor comes back
        assert not any(layer.merged for layer in layers)


# ---------------------------------------------------------------------------------------------------- checkpoints


def is_adapter_key(key: str) -> bool:
    return any(part in key for part in _LORA_KEY_PARTS)


def adapter_state(full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of an HF-model state dict (keys as in `model.state_dict()`)."""
    return {key: value for key, value in full_state.items() if is_adapter_key(key)}


def merged_state(full_state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A plain HF state dict with every adapter folded in: W' = W + scale · B·A (peft's delta for a Linear).

    Computed out of place in float32 and cast to W's dtype, so the live base weights are untouched.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in full_state.items():
        if is_adapter_key(key):
            continue
        merged[key.replace(_BASE_LAYER, ".")] = value
    for module, scale in scalings.items():
        weight_key = f"{module}.weight"
        a = full_state[f"{module}.lora_A.{ADAPTER_NAME}.weight"]
        b = full_state[f"{module}.lora_B.{ADAPTER_NAME}.weight"]
        base = merged[weight_key]
        delta = (b.float() @ a.float()) * scale
        merged[weight_key] = (base.float() + delta).to(base.dtype)
    assert not any("lora_" in key or _BASE_LAYER in key for key in merged), "adapter keys left in the merged state"
    return merged


class CheckpointWriter:
    """What `checkpoint.save_checkpoint` gets as its `model` in a LoRA run: writes the layout in the docstring.

    The stages call save_checkpoint with dtype="float32" for it, so `save_pretrained` receives the raw training
    state: the adapter is always written in float32 (exact resume); the merged export is written in the compute
    dtype `dtype` for consumers with, when that is not float32, its float32 masters beside it (`precision`), which
    the RL stage loads for the SFT→RL hand-off exactly as after a full fine-tune.
    `save_pretrained(directory, state_dict)`: `state_dict` is the HF model's full state (FSDP2 gathers it on rank 0)
    or None to read it from the live model.
    """

    def __init__(self, adapters: Adapters, final: bool, dtype: str) -> None:
        self.adapters = adapters
        self.final = final
        self.dtype = dtype

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.adapters.model.state_dict()

    def save_pretrained(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from integration_training import precision

        full = state_dict if state_dict is not None else self.adapters.model.state_dict()
        adapter = adapter_state(full)
        assert adapter and all(t.dtype == torch.float32 for t in adapter.values()), "adapters are float32"
        # peft names the HF model's tensors from the PeftModel: base_model.model.<key>.
        peft_keys = {f"base_model.model.{key}": value for key, value in adapter.items()}
        self.adapters.peft_model.save_pretrained(str(adapter_dir(directory)), state_dict=peft_keys)
        if not self.final:
            return
        model = self.adapters.model
        merged = merged_state(full, self.adapters.scalings())
        if precision.is_mixed(self.dtype):  # as checkpoint.save_checkpoint does for a full fine-tune
            model.save_pretrained(directory, state_dict=precision.consumer_state_dict(merged, self.dtype))
            precision.record_dtype(Path(directory), self.dtype)
            precision.save_masters(merged, Path(directory))
        else:
            model.save_pretrained(directory, state_dict=merged)


# ---------------------------------------------------------------------------------------------------- inference


def holds_adapter_only(step_dir: Path) -> bool:
    """A LoRA checkpoint step that is not its stage's last: an adapter and the train state, no merged model."""
    step_dir = Path(step_dir)
    return (adapter_dir(step_dir) / "adapter_config.json").is_file() and not (step_dir / "config.json").is_file()


def final_merged_step(step_dir: Path) -> Path | None:
    """The latest sibling step directory that holds a merged model (its stage's final checkpoint), if any."""
    merged = sorted(p for p in Path(step_dir).parent.glob("step_*") if (p / "config.json").is_file())
    return merged[-1] if merged else None


def load_adapter_step(step_dir: Path, dtype: str, device: torch.device) -> nn.Module:
    """An adapter-only step directory as a plain model in `dtype`, for inference: the base model peft recorded in
    the adapter's config (the model the run trained on) + this adapter, merged by peft (`merge_and_unload`).

    The base loads as training does (float32, a checkpoint's float32 masters), the merge runs in float32 and the
    result is cast to `dtype` — what the stage's final export would hold had the stage ended at this step.
    UserError when the base is gone, naming the stage's merged final checkpoint to pass instead.
    """
    from peft import PeftModel

    from integration_training import precision
    from integration_training.models import load_model, resolve_model_path

    source = adapter_dir(step_dir)
    base = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
    local = Path(str(base)).expanduser() if base else None
    if not base or (not local.exists() and (local.is_absolute() or str(base).count("/") > 1)):
        final = final_merged_step(step_dir)
        instead = (f"pass {final}, the stage's final checkpoint, which holds the merged model" if final is not None
                   else "pass the stage's final step directory (it holds the merged model)")
        raise UserError(f"{step_dir}: holds only a LoRA adapter, and its base model {base!r} (recorded in "
                        f"{source / 'adapter_config.json'}) is not there; {instead}")
    model = load_model(resolve_model_path(str(base)), "float32", "sdpa", device, training=True)
    merged = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    assert not any(is_adapter_key(key) or _BASE_LAYER in key for key in merged.state_dict()), "adapters left"
    return merged.to(precision.torch_dtype(dtype)).eval()


def _adapted_linears(model: nn.Module, lora: LoRAConfig) -> list[nn.Module]:
    """The linear layers `lora` attaches adapters to (works on a meta-device model)."""
    modules = dict(model.named_modules())
    return [modules[name] for name in resolve_targets(model, lora)]


def adapted_weight_count(model: nn.Module, lora: LoRAConfig) -> int:
    """Elements of the base weights the adapters are attached to (in · out per adapted linear layer): what
    `merged_for_sampling` copies while it samples."""
    return sum(m.in_features * m.out_features for m in _adapted_linears(model, lora))


def adapter_parameter_count(model: nn.Module, lora: LoRAConfig) -> int:
    """Parameters the adapters add (r · (in + out) per adapted linear layer)."""
    return sum(lora.r * (m.in_features + m.out_features) for m in _adapted_linears(model, lora))
