"""The schema: no defaults, every problem named, all problems at once, JSON round-trip."""

import dataclasses
import runpy
from pathlib import Path

import pytest

from integration_training.config import (
    Config,
    ConfigError,
    DatasetSpec,
    TargetConfig,
    from_json,
    to_json,
    validate,
)

from helpers import replace_nested

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("0*.py"))


def shipped(name: str) -> Config:
    return runpy.run_path(str(REPO / "configs" / name))["config"]


def replace(config: Config, section: str, **changes) -> Config:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def problems_of(config: Config) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(config)
    return caught.value.problems


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_round_trip(path):
    config = runpy.run_path(str(path))["config"]
    validate(config)
    assert from_json(to_json(config)) == config


@pytest.mark.parametrize("schema", [TargetConfig, DatasetSpec])
def test_every_missing_field_is_named(schema):
    with pytest.raises(ConfigError) as caught:
        schema()
    names = [f.name for f in dataclasses.fields(schema)]
    assert len(caught.value.problems) == len(names)
    for name in names:
        assert any(f"{schema.__name__}.{name}: missing" in p for p in caught.value.problems)


def test_no_field_has_a_default():
    from integration_training import config as schema_module

    schemas = [Config, DatasetSpec, *(getattr(schema_module, f.type) for f in dataclasses.fields(Config))]
    for schema in schemas:
        for field in dataclasses.fields(schema):
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name


def test_unknown_field_is_rejected_with_a_suggestion():
    spec = dict(name="arithmetic", split="train", subset=None, max_samples=4, repeat=1, path=None, reward=None)
    with pytest.raises(ConfigError) as caught:
        DatasetSpec(**spec, max_sample=3)
    (problem,) = caught.value.problems
    assert "DatasetSpec.max_sample: unknown field" in problem and "max_samples" in problem


def test_positional_arguments_are_refused():
    with pytest.raises(ConfigError, match="by keyword"):
        TargetConfig([], "cpu", 1, "none", 1, 0, "127.0.0.1", 29500)


def test_wrong_types_are_named():
    base = shipped("00_offline_cpu.py")
    config = replace(base, "sft", batch_size="8", packing=1)
    config = replace(config, "model", compile="no")
    problems = problems_of(config)
    assert any(p.startswith("sft.batch_size: expected an integer") for p in problems)
    assert any(p.startswith("sft.packing: expected True/False") for p in problems)
    assert any(p.startswith("model.compile: expected True/False") for p in problems)


def test_bool_is_not_accepted_as_an_integer():
    problems = problems_of(replace(shipped("00_offline_cpu.py"), "sft", batch_size=True))
    assert any(p.startswith("sft.batch_size") for p in problems)


def test_out_of_range_values_are_named():
    base = shipped("00_offline_cpu.py")
    config = replace_nested(base, {"rl": {"sampling": {"temperature": -1.0}, "advantage": "median", "clip_eps": 0.0},
                                   "sft": {"optimizer": {"warmup_ratio": 1.5, "lr_schedule": "step"}}})
    problems = problems_of(config)
    for prefix in ("rl.sampling.temperature", "rl.advantage", "rl.clip_eps", "sft.optimizer.warmup_ratio",
                   "sft.optimizer.lr_schedule"):
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)


def test_several_problems_are_reported_in_one_error():
    base = shipped("00_offline_cpu.py")
    config = replace(base, "target", gpu_ranks=[0], parallelism="ddp")
    config = replace(config, "output", mode="rl", log_level="LOUD")
    config = replace(config, "sft", examples_per_step=6)
    problems = problems_of(config)
    expected = [
        "target.gpu_ranks",  # cpu with GPUs
        "target.parallelism",  # one process with ddp
        "output.source_checkpoint",  # rl without a source
        "output.log_level",
        "sft.examples_per_step",  # 6 not divisible by batch 4
        "evaluation.after_sft",  # mode rl runs no SFT
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert len(problems) >= len(expected)


def test_cross_field_rules():
    base = shipped("00_offline_cpu.py")
    cuda = replace(base, "target", device_type="cuda", gpu_ranks=[0, 1], processes_per_node=1)
    assert any(p.startswith("target.processes_per_node: must equal len(gpu_ranks)=2") for p in problems_of(cuda))
    sft_rl_with_source = replace(base, "output", source_checkpoint="/tmp/x")
    assert any(p.startswith("output.source_checkpoint: must be None") for p in problems_of(sft_rl_with_source))
    rl_batches = replace(base, "rl", batch_size=7)
    assert any(p.startswith("rl.batch_size") for p in problems_of(rl_batches))
    no_sampling_rows = replace_nested(base, {"rl": {"sampling": {"batch_size": 0}}})
    assert any(p.startswith("rl.sampling.batch_size") for p in problems_of(no_sampling_rows))
    no_eval = replace(base, "evaluation", mixture=[])
    assert any(p.startswith("evaluation.mixture") for p in problems_of(no_eval))
    all_off = replace(no_eval, "evaluation", at_start=False, after_sft=False, after_rl=False, every_rl_steps=0)
    validate(all_off)  # no evaluation runs: an empty mixture is fine


def test_json_round_trip_is_equal_and_names_missing_keys():
    config = shipped("02_nanochat_reference.py")
    text = to_json(config)
    assert from_json(text) == config
    broken = text.replace('"master_addr": "127.0.0.1",', "")
    with pytest.raises(ConfigError, match="TargetConfig.master_addr: missing"):
        from_json(broken)
