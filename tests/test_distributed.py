"""Multi-process training on CPU (gloo, 2 processes, tiny model): data shards, DDP/FSDP2 equivalence with one
process, deploy.py's torchrun relaunch (sft+rl, resume, two nodes on localhost) and its exit codes.

Run as a script (`torchrun --nproc_per_node=2 tests/test_distributed.py OUT_DIR`) this file is also the worker of the
equivalence test: each rank trains one step with DDP and with FSDP2 and rank 0 saves the resulting weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import arithmetic, make_config, optimization, save_tiny_model_dir, smollm2_tokenizer
from integration_training import distributed
from integration_training import template
from integration_training.config import Config, ModelConfig, to_json
from integration_training.data import build_mixture
from integration_training.rl import PolicyModels, Sequence_, step_prompt_indices, train_on_rows
from integration_training.sft import SFTStream, SupervisedTokenLoss, rank_micro_batches, train_step

REPO = Path(__file__).resolve().parents[1]
SINGLE = distributed.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
GLOBAL_BATCH = 4  # sequences (SFT) per step over all ranks
RL_PROMPTS, RL_SAMPLES = 4, 2
F32 = ModelConfig(name="unused", dtype="float32", compile=False, attn_implementation="sdpa", gradient_checkpointing=False,
                  lora=None)


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env() -> dict[str, str]:
    # One thread per process: two ranks share two (busy) cores. No network, no GPU.
    # tests/ on the path: the RL runs import `test_distributed:text_hash_reward` as their reward.
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=path)


def text_hash_reward(completion: str, reference: str | None) -> float:
    """A fractional reward that differs between a random tiny model's samples, so RL groups get non-zero
    advantages (arithmetic's verifier gives all zeros, and RL would then not change the weights at all)."""
    return float(sum(map(ord, completion)) % 5) / 4


def write_config(path: Path, config: Config, extra: str = "") -> Path:
    """A config file as deploy.py reads it (the JSON snapshot is the whole config; `extra` is appended code)."""
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n{extra}")
    return path


def deploy(config_file: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), str(config_file), *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def two_process_config(tmp_path: Path, parallelism: str, mode: str, **sections) -> Config:
    target = dict(processes_per_node=2, parallelism=parallelism, master_port=free_port()) | sections.pop("target", {})
    rl_train = dataclasses.replace(arithmetic("train", 16), reward="test_distributed:text_hash_reward")
    data = dict(rl_mixture=[rl_train]) | sections.pop("data", {})
    return make_config(tmp_path, target=target, output=dict(mode=mode), data=data, **sections)


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------------- data shards


def rank(r: int) -> distributed.Dist:
    return dataclasses.replace(SINGLE, rank=r, world_size=2, is_main=r == 0)


def test_ranks_see_disjoint_shards_whose_union_is_the_single_process_epoch():
    # Each conversation is identified by its (unique) token sequence.
    conversations = [template.Rendered(input_ids=[i + 1, i + 2, 7], loss_mask=[0, 1, 1]) for i in range(19)]
    stream = SFTStream(rendered=conversations, seed=3, packing=False, max_length=64, sequences_per_step=GLOBAL_BATCH)
    seen_single, seen_by_rank = [], {0: [], 1: []}
    for step in range(len(conversations) // GLOBAL_BATCH):  # the steps wholly inside epoch 0
        sequences = stream.step_sequences(step)
        single = {tuple(row.tolist()) for b in rank_micro_batches(sequences, GLOBAL_BATCH, SINGLE, False, 0, "sdpa")
                  for row in b.input_ids}
        per_rank = {r: {tuple(row.tolist()) for b in rank_micro_batches(sequences, 1, rank(r), False, 0, "sdpa")
                        for row in b.input_ids} for r in (0, 1)}
        assert not per_rank[0] & per_rank[1], "a sequence was given to both ranks"
        assert per_rank[0] | per_rank[1] == single, "the ranks together must see exactly the single-process step"
        assert len(per_rank[0]) == len(per_rank[1]) == GLOBAL_BATCH // 2
        seen_single += single
        for r in (0, 1):
            seen_by_rank[r] += per_rank[r]
    assert sorted(seen_by_rank[0] + seen_by_rank[1]) == sorted(seen_single)
    assert len(seen_single) == (len(conversations) // GLOBAL_BATCH) * GLOBAL_BATCH  # the whole epoch, steps only

    # RL: prompts (not rows) are sharded, so every sample of a prompt's group is drawn and trained on one rank.
    for step in range(5):
        prompts = step_prompt_indices(step, RL_PROMPTS, 10, seed=0)
        mine = {r: distributed.shard(prompts, rank(r)) for r in (0, 1)}
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(prompts)
        assert len(mine[0]) == len(mine[1]) == RL_PROMPTS // 2


# ---------------------------------------------------------------------------------------------------- equivalence


def sft_sequences():
    tokenizer = smollm2_tokenizer()
    examples = build_mixture([arithmetic("train", GLOBAL_BATCH)], seed=0).examples
    rendered, _ = template.render_examples(tokenizer, examples, 256)
    assert len(rendered) == GLOBAL_BATCH
    return [[r] for r in rendered]


def rl_rows() -> list[Sequence_]:
    """Fixed rollouts, prompt-major: RL_PROMPTS groups of RL_SAMPLES completions with non-zero advantages."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for p in range(RL_PROMPTS):
        prompt = torch.randint(10, 1000, (4 + p,), generator=g).tolist()
        for s in range(RL_SAMPLES):
            completion = torch.randint(10, 1000, (3 + s + p % 2,), generator=g).tolist()
            rows.append(Sequence_(prompt, completion, [0.0] * len(completion), 1.0 if s == 0 else -1.0, float(s == 0)))
    return rows


def rank_rl_rows(rows: list[Sequence_], dist: distributed.Dist) -> list[Sequence_]:
    groups = [rows[i : i + RL_SAMPLES] for i in range(0, len(rows), RL_SAMPLES)]
    return [row for group in distributed.shard(groups, dist) for row in group]


def one_update(model_dir: Path, config: Config, dist: distributed.Dist, kind: str) -> dict:
    """Weights and pre-clip gradient norm of one SFT (`kind="sft"`) or RL step on this rank's share of the fixed
    global batch: {"weights": state dict, "grad_norm": float}.

    The weights alone cannot show a wrong gradient scale (a lost ×world_size): AdamW's first step moves each weight
    by ~lr·sign(g) and clipping rescales anyway, so the pre-clip norm is compared too."""
    from integration_training.models import load_model
    from integration_training.optim import build_optimizer

    model = load_model(str(model_dir), "float32", "sdpa", dist.device, training=True)
    model.train()
    stage = config.sft if kind == "sft" else config.rl
    if kind == "sft":
        loss_module = SupervisedTokenLoss(model, "float32", True)
        wrapped = distributed.wrap_model(loss_module, config.target, dist, "float32")
        optimizer = build_optimizer(model, stage.optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        micro = rank_micro_batches(sft_sequences(), GLOBAL_BATCH // dist.world_size, dist, False, 0, "sdpa")
        grad_norm = train_step(wrapped, optimization(optimizer, stage.optimizer.grad_clip, dist), micro, tokens=0,
                               lr_multiplier=1.0).grad_norm
        state_of, prefix = loss_module, "model."
    else:
        wrapped = distributed.wrap_model(model, config.target, dist, "float32")
        optimizer = build_optimizer(model, stage.optimizer)
        grad_norm = train_on_rows(PolicyModels.of(wrapped, None, F32), optimization(optimizer, stage.optimizer.grad_clip, dist),
                                  rank_rl_rows(rl_rows(), dist), rl=stage, pad_id=0)["grad_norm"]
        state_of, prefix = model, ""
    if distributed.is_sharded(config.target, dist):
        weights = distributed.full_model_state(state_of, prefix)
    else:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "grad_norm": float(grad_norm)}


def equivalence_config(tmp_path: Path, parallelism: str, world: int) -> Config:
    return make_config(
        tmp_path,
        target=dict(processes_per_node=world, parallelism=parallelism),
        sft=dict(batch_size=GLOBAL_BATCH // world, examples_per_step=GLOBAL_BATCH, optimizer=dict(grad_clip=1.0)),
        rl=dict(examples_per_step=RL_PROMPTS, num_samples=RL_SAMPLES, batch_size=2,
                optimizer=dict(matrix_lr=1e-3, embedding_lr=1e-3, unembedding_lr=1e-3, grad_clip=1.0)),
    )


def lockstep_sampling(model_dir: Path, config: Config, dist: distributed.Dist) -> dict:
    """FSDP2 greedy sampling where the ranks make different numbers of forward calls (more prompts on rank 0,
    rank 1 stopping after its first token); returns this rank's completions and call counts."""
    from integration_training.models import load_model
    from integration_training.rollout import SamplingSettings, SpecialTokens, sample

    model = load_model(str(model_dir), "float32", "sdpa", dist.device, training=True)
    distributed.wrap_model(model, config.target, dist, "float32")
    prompts = [[11, 12, 13], [21, 22], [31, 32, 33, 34]] if dist.rank == 0 else [[41, 42]]
    stops = frozenset() if dist.rank == 0 else frozenset(range(model.config.vocab_size))
    proxy = distributed.LockstepModel(model, dist)
    out = sample(proxy, prompts, num_samples=1, settings=SamplingSettings(max_new_tokens=4, temperature=0.0, top_k=0, batch_size=2),
                 special=SpecialTokens(stop_ids=stops, pad_id=0), generator=torch.Generator().manual_seed(0),
                 greedy_first=False)
    calls = proxy.forward_calls
    dummies = proxy.drain()
    return {"prompts": prompts, "stops": sorted(stops)[:1], "tokens": [c[0].token_ids for c in out],
            "calls": calls, "dummies": dummies}


def worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    model_dir = out_dir / "tiny_model"
    results = {}
    for parallelism in ("ddp", "fsdp2"):
        config = equivalence_config(out_dir, parallelism, 2)
        dist = distributed.init_distributed(config.target)
        for kind in ("sft", "rl"):
            results[f"{parallelism}_{kind}"] = one_update(model_dir, config, dist, kind)
    config = equivalence_config(out_dir, "fsdp2", 2)
    dist = distributed.init_distributed(config.target)
    results["lockstep"] = distributed.all_gather_objects([lockstep_sampling(model_dir, config, dist)], dist)
    if dist.is_main:
        torch.save(results, out_dir / "results.pt")
    distributed.barrier(dist)
    distributed.destroy_distributed(dist)


def test_ddp_and_fsdp2_updates_equal_one_process_with_the_same_global_batch(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny_model")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               __file__, str(tmp_path)]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=240, cwd=REPO / "tests")
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)

    initial = checkpoint_weights(model_dir)
    single_config = equivalence_config(tmp_path, "none", 1)
    for kind in ("sft", "rl"):
        expected = one_update(model_dir, single_config, SINGLE, kind)
        moved = max(float((expected["weights"][k] - initial[k]).abs().max()) for k in initial)
        assert moved > 1e-4, f"{kind}: the update is too small to tell anything apart"
        assert expected["grad_norm"] > 1.0, f"{kind}: clipping at 1.0 must be active for the norm check to matter"
        for parallelism in ("ddp", "fsdp2"):
            got = results[f"{parallelism}_{kind}"]
            # A gradient scaled by 1/world_size (or ×world_size) halves (doubles) this norm: rel 1e-4 sees it.
            assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (parallelism, kind)
            assert_same_weights(got["weights"], expected["weights"], atol=1e-6)

    # Lockstep: rank 1 made fewer forwards and paired rank 0's extra ones with dummies; outputs are unaffected.
    ranks = results["lockstep"]
    assert ranks[0]["calls"] > ranks[1]["calls"]
    assert ranks[1]["dummies"] == ranks[0]["calls"] - ranks[1]["calls"] and ranks[0]["dummies"] == 0
    from integration_training.models import load_model
    from integration_training.rollout import SamplingSettings, SpecialTokens, sample

    model = load_model(str(model_dir), "float32", "sdpa", torch.device("cpu"), training=True)
    for r in ranks:
        stops = frozenset(range(model.config.vocab_size)) if r["stops"] else frozenset()
        out = sample(model, r["prompts"], num_samples=1, settings=SamplingSettings(max_new_tokens=4, temperature=0.0, top_k=0, batch_size=2),
                     special=SpecialTokens(stop_ids=stops, pad_id=0), generator=torch.Generator().manual_seed(0),
                     greedy_first=False)
        assert [c[0].token_ids for c in out] == r["tokens"]


# ---------------------------------------------------------------------------------------------------- deploy.py


@pytest.mark.slow  # two torchrun ranks, SFT then RL: 50-180 s on 2 loaded cores
def test_two_process_sft_then_rl_run_writes_a_checkpoint_one_process_can_load(tmp_path):
    from transformers import AutoModelForCausalLM

    config = two_process_config(tmp_path, "ddp", "sft+rl", evaluation=dict(num_problems=3))
    assert_ok(deploy(write_config(tmp_path / "cfg.py", config)))
    run = config.output.save_dir / config.output.experiment_name
    final = run / "checkpoints" / "rl" / "step_000002"
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert sum(p.numel() for p in model.parameters()) > 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["stage"] == "sft" and "loss" in line] == [1, 2, 3, 4]  # rank 0 only
    evals = [line for line in lines if line["stage"] in ("eval", "rl") and "eval/num_problems" in line]
    assert evals and all(line["eval/num_problems"] == 3 for line in evals)  # an odd count: no problem dropped


@pytest.mark.slow  # three FSDP2 deploy runs: 50-180 s on 2 loaded cores
def test_fsdp2_resume_at_world_size_two_matches_an_uninterrupted_run(tmp_path):
    config = two_process_config(tmp_path, "fsdp2", "sft+rl", sft=dict(checkpoint_every=2), rl=dict(checkpoint_every=1))
    config_file = write_config(tmp_path / "cfg.py", config)
    assert_ok(deploy(config_file))
    checkpoints = config.output.save_dir / config.output.experiment_name / "checkpoints"
    sft_final, rl_final = checkpoints / "sft" / "step_000004", checkpoints / "rl" / "step_000002"
    uninterrupted = {"sft": checkpoint_weights(sft_final), "rl": checkpoint_weights(rl_final)}
    assert not torch.equal(uninterrupted["sft"]["lm_head.weight"], uninterrupted["rl"]["lm_head.weight"])

    # As if killed right after SFT's step-2 checkpoint: SFT resumes mid-way, then RL runs from its start.
    import shutil

    shutil.rmtree(sft_final)
    shutil.rmtree(checkpoints / "rl")
    assert_ok(deploy(config_file, "--resume"))
    assert_same_weights(checkpoint_weights(sft_final), uninterrupted["sft"])
    assert_same_weights(checkpoint_weights(rl_final), uninterrupted["rl"])

    # As if killed after RL's step 1: the sharded optimizer state is restored from the gathered checkpoint.
    shutil.rmtree(rl_final)
    assert_ok(deploy(config_file, "--resume"))
    assert_same_weights(checkpoint_weights(rl_final), uninterrupted["rl"])


def test_resuming_with_another_world_size_or_parallelism_is_a_user_error():
    from integration_training.errors import UserError
    from integration_training.stage import Layout

    saved = Layout(world_size=2, parallelism="fsdp2", examples_per_step=4, per_step_field="rl.examples_per_step")
    saved.check(saved.state_dict(), Path("step_000001"))
    for world, parallelism in ((1, "none"), (4, "fsdp2"), (2, "ddp")):
        now = Layout(world_size=world, parallelism=parallelism, examples_per_step=4, per_step_field="rl.examples_per_step")
        with pytest.raises(UserError, match="world_size"):
            now.check(saved.state_dict(), Path("step_000001"))


@pytest.mark.slow  # two torchrun nodes: 50-180 s on 2 loaded cores
def test_two_nodes_on_localhost_train_and_write_one_checkpoint(tmp_path):
    port = free_port()
    node = {r: two_process_config(tmp_path, "ddp", "sft",
                                  target=dict(processes_per_node=1, num_nodes=2, node_rank=r, master_port=port))
            for r in (0, 1)}
    files = {r: write_config(tmp_path / f"node{r}.py", node[r]) for r in (0, 1)}
    launches = {r: subprocess.Popen([sys.executable, str(REPO / "deploy.py"), str(files[r])], env=child_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for r in (0, 1)}
    outputs = {r: launches[r].communicate(timeout=240) for r in (0, 1)}
    for r in (0, 1):
        assert launches[r].returncode == 0, outputs[r][1][-3000:]
    stage_dir = node[0].output.save_dir / node[0].output.experiment_name / "checkpoints" / "sft"
    assert [p.name for p in stage_dir.iterdir()] == ["step_000004"]
    assert "world 2" in outputs[0][1]  # one process per node, two in the job


@pytest.mark.slow  # two torchrun ranks (~25 s on 2 loaded cores); single-process user errors: test_bad_configs.py
def test_a_user_error_on_one_rank_stops_the_job_with_exit_2(tmp_path):
    # The config file runs in every process; on rank 1 only it makes SFT fail as a user error would.
    fail_on_rank_1 = (
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import integration_training.sft as sft\n"
        "    from integration_training.errors import UserError\n"
        "    def refuse(*args, **kwargs):\n"
        "        raise UserError('data.sft_mixture: rank 1 cannot read its shard')\n"
        "    sft.run_sft = refuse\n"
    )
    config = two_process_config(tmp_path, "ddp", "sft",
                                evaluation=dict(mixture=[], at_start=False, after_sft=False, after_rl=False))
    started = time.perf_counter()
    result = deploy(write_config(tmp_path / "cfg.py", config, extra=fail_on_rank_1), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: data.sft_mixture: rank 1 cannot read its shard"
    assert time.perf_counter() - started < 100  # rank 0 was stopped, not left waiting in a collective


def test_master_port_in_use_is_a_user_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = two_process_config(tmp_path, "ddp", "sft", target=dict(master_port=busy.getsockname()[1]))
        result = deploy(write_config(tmp_path / "cfg.py", config), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "already in use" in result.stderr and "Traceback" not in result.stderr


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
