"""deploy.py as a user meets it: exit codes, one-line errors, dry-run plans, refusal to overwrite."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration_training import cli
from integration_training.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def deploy(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    # No network: hub sources must be described, never fetched, by a dry run.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(REPO / "deploy.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def config_text(**replacements: str) -> str:
    text = (REPO / "configs" / "00_offline_cpu.py").read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from base_config import Config\n\nconfig = Config(\n  target=(\n")
    result = deploy(str(bad), "--dry-run")
    assert_one_line_user_error(result, f"{bad}:", "syntax error")
    assert len(result.stderr.strip().splitlines()) == 1


def test_file_without_config_exits_2(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    result = deploy(str(empty), "--dry-run")
    assert_one_line_user_error(result, "defines no `config`")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file_exits_2(tmp_path):
    assert_one_line_user_error(deploy(str(tmp_path / "nope.py")), "does not exist")


def test_missing_field_in_file_names_line_and_field(tmp_path):
    path = tmp_path / "missing.py"
    path.write_text(config_text(**{"        master_port=29500,\n": ""}))
    result = deploy(str(path), "--dry-run")
    assert_one_line_user_error(result, "TargetConfig.master_port: missing", f"{path}:")


def test_validation_reports_all_problems_at_once(tmp_path):
    path = tmp_path / "many.py"
    path.write_text(config_text(**{'log_level="INFO"': 'log_level="LOUD"', "examples_per_step=4,": "examples_per_step=6,"}))
    result = deploy(str(path), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "output.log_level" in result.stderr and "sft.examples_per_step" in result.stderr


@pytest.mark.parametrize("name", ["00_offline_cpu.py", "01_debug_sft_rl.py", "02_nanochat_reference.py"])
def test_dry_run_of_shipped_configs(name):
    result = deploy(f"configs/{name}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "== plan for" in result.stdout and "SFT:" in result.stdout and "RL:" in result.stdout


def cuda_config_on_an_absent_gpu(tmp_path: Path) -> Path:
    """configs/01 with a GPU id no host has: the CLI maps gpu_ranks to CUDA_VISIBLE_DEVICES, so the shipped [0]
    would find a real GPU on a GPU host (the test must not depend on the host's devices)."""
    text = (REPO / "configs" / "01_debug_sft_rl.py").read_text()
    assert text.count("gpu_ranks=[0]") == 1
    path = tmp_path / "01_absent_gpu.py"
    path.write_text(text.replace("gpu_ranks=[0]", "gpu_ranks=[97]"))
    return path


def test_dry_run_of_cuda_config_says_the_device_is_absent(tmp_path):
    result = deploy(str(cuda_config_on_an_absent_gpu(tmp_path)), "--dry-run")
    assert "no CUDA GPU is visible" in result.stdout
    assert "downloaded at run time" in result.stdout


def test_offline_dry_run_shows_counts_and_a_marked_example():
    result = deploy("configs/00_offline_cpu.py", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "word_problems" in result.stdout and "64 selected" in result.stdout
    assert "tools=['calculator']" in result.stdout
    assert "«" in result.stdout and "»" in result.stdout


def test_real_run_of_cuda_config_without_gpu_exits_2_before_loading(tmp_path):
    result = deploy(str(cuda_config_on_an_absent_gpu(tmp_path)), cwd=tmp_path)
    assert_one_line_user_error(result, "no CUDA GPU is visible", "device_type='cpu'")
    assert not (tmp_path / "results").exists()


def test_existing_checkpoints_are_never_overwritten_without_resume(tmp_path):
    config = cli.load_config_file(REPO / "configs" / "00_offline_cpu.py")
    import dataclasses

    config = dataclasses.replace(config, output=dataclasses.replace(config.output, save_dir=tmp_path))
    step = tmp_path / "00_offline_cpu" / "checkpoints" / "sft" / "step_000003"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (step / "train_state.pt").write_bytes(b"")  # presence marks a complete checkpoint
    with pytest.raises(UserError, match="--resume"):
        cli.prepare_run_dir(config, resume=False, is_main=True)
    with pytest.raises(UserError, match="no \\*.safetensors weights"):  # resume checks the checkpoint is whole
        cli.prepare_run_dir(config, resume=True, is_main=True)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(step / "model.safetensors"))
    torch.save({"step": 3}, step / "train_state.pt")
    run_dir = cli.prepare_run_dir(config, resume=True, is_main=True)
    assert (run_dir / "config.json").is_file()


def test_resume_without_checkpoints_is_refused(tmp_path):
    import dataclasses

    config = cli.load_config_file(REPO / "configs" / "00_offline_cpu.py")
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, save_dir=tmp_path))
    with pytest.raises(UserError, match="no checkpoints"):
        cli.prepare_run_dir(config, resume=True, is_main=True)


def test_torchrun_command_carries_the_rendezvous():
    import dataclasses

    config = cli.load_config_file(REPO / "configs" / "00_offline_cpu.py")
    target = dataclasses.replace(config.target, processes_per_node=2, num_nodes=2, node_rank=1, master_port=29555)
    command = cli.torchrun_command(dataclasses.replace(config, target=target), "configs/x.py", resume=True)
    for flag in ("--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_port=29555", "--master_addr=127.0.0.1"):
        assert flag in command
    assert command[-2:] == ["configs/x.py", "--resume"]


# Training and evaluation machinery a dry run never runs; importing it would only slow `--dry-run` down.
NOT_FOR_A_DRY_RUN = ("sft", "rl", "evaluate", "rollout", "checkpoint", "optim", "metrics", "distributed",
                     "data.prepared", "data.stream", "signals", "report")


def test_dry_run_imports_no_training_code():
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from integration_training import cli\n"
        "code = cli.main(['configs/00_offline_cpu.py', '--dry-run'])\n"
        "print('MODULES', ' '.join(sorted(m for m in sys.modules if m.startswith('integration_training.'))))\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(result.stdout.split("MODULES", 1)[1].split())
    assert "integration_training.plan" in imported  # the probe saw a real dry run
    assert not imported & {f"integration_training.{name}" for name in NOT_FOR_A_DRY_RUN}, sorted(imported)


def test_use_wandb_without_wandb_installed_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from integration_training import models

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec says None, import fails
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
    path = tmp_path / "wandb_config.py"
    path.write_text(config_text(**{"use_wandb=False": "use_wandb=True",
                                   'save_dir=Path("./results")': f"save_dir=Path({str(tmp_path / 'out')!r})"}))
    for args in ([str(path)], [str(path), "--dry-run"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
        assert "output.use_wandb" in err and "pip install 'integration-training[wandb]'" in err
        assert "use_wandb=False" in err
    assert not (tmp_path / "out").exists()  # refused before the run directory was made
