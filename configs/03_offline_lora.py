"""Offline LoRA: SmolLM2-135M-Instruct training LoRA adapters instead of every weight, on 2 CPU cores.

SFT then RL on procedural arithmetic (GSM8K format, no tools: the offline default's task before it took the
calculator and word problems; this config's settings were measured on it), ending with the same
baseline → SFT → RL table as configs/00_offline_cpu.py. Only the adapters train (4.9M parameters, 3.6 % of the
model); AdamW's state is 3.6 % of a full fine-tune's. Each stage's final checkpoint holds the adapter (checkpoints/<stage>/step_N/adapter, for
peft.PeftModel.from_pretrained) and the merged model (a plain HF directory). RL starts from SFT's merged model with
fresh adapters; with kl_coef > 0 its reference would be that same model with the adapters switched off (no copy).
"""

from pathlib import Path

from base_config import (
    Config,
    DataConfig,
    DatasetSpec,
    EvalConfig,
    LoRAConfig,
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
        lora=LoRAConfig(
            r=16,
            alpha=32.0,  # the update is (alpha / r) · B·A = 2 · B·A
            dropout=0.0,  # 64 SFT problems for one epoch: nothing to regularise, and dropout would slow CPU steps
            target_modules=["all-linear"],  # q/k/v/o and gate/up/down of every layer; never the (tied) LM head
        ),
    ),
    data=DataConfig(
        # A short SFT on purpose: 64 problems teach the worked-answer format (greedy 0 → ~0.15) but leave sampling at
        # temperature 1 loose (sampled pass@1 ~0.05), which is what RL tightens within 10 steps. Measured: after
        # 120-200 problems SFT was already sharp (after 160: sampled 0.13, greedy 0.18, token entropy ~0.1 nats)
        # and 10-12 RL steps moved it by -0.04..+0.02; after 64, the same RL gave +0.05 (paired p < 0.001). It
        # also costs 80 s of the 10-minute budget instead of 150.
        sft_mixture=[
            DatasetSpec(name="arithmetic", split="train", subset=None, max_samples=64, repeat=1, path=None, reward=None),
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
            DatasetSpec(name="arithmetic", split="test", subset=None, max_samples=32, repeat=1, path=None, reward=None),
        ],
        rl_mixture=[
            DatasetSpec(name="arithmetic", split="train", subset=None, max_samples=512, repeat=1, path=None, reward=None),
        ],
        max_length=256,
        shuffle_seed=42,
        tools=[],  # [] = no tool calls; ["calculator"] = <<EXPR=RESULT>> computed by the engine
    ),
    sft=SFTConfig(
        num_epochs=1,
        num_iterations=-1,
        batch_size=4,
        examples_per_step=4,
        optimizer=OptimizerConfig(
            name="adamw",
            # LoRA trains only adapters, all at matrix_lr; embedding/unembedding have no trainable tensor here (the
            # plan says so) and keep the full fine-tune's values. Adapters start at B = 0 and need ~10x the full
            # fine-tune's LR (00_offline_cpu.py: 1e-4) to move as far in the same 7 steps.
            embedding_lr=1e-4,
            unembedding_lr=1e-4,
            matrix_lr=1e-3,
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
        num_iterations=10,
        examples_per_step=8,
        num_samples=8,
        batch_size=64,
        sampling=SamplingConfig(
            # Rows per sampling forward: one step's 8 × 8 = 64 rollouts fit in one forward.
            batch_size=500,
            max_new_tokens=24,  # the longest worked answer is 22 tokens + end-of-turn
            temperature=1.0,
            top_k=0,
        ),
        optimizer=OptimizerConfig(
            name="adamw",
            # RL at a tenth of SFT's LR as in 00_offline_cpu.py, scaled like SFT's for adapters (full: 1e-5).
            embedding_lr=1e-5,
            unembedding_lr=1e-5,
            matrix_lr=1e-4,
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
            DatasetSpec(name="arithmetic", split="test", subset=None, max_samples=200, repeat=1, path=None, reward=None),
        ],
        num_problems=200,
        # 3 samples + greedy per problem: with 4 the three evaluations alone took ~340 s of the 600.
        num_samples=3,
        sampling=SamplingConfig(
            # Rows per sampling forward. CPU decode is memory-bound at 64 rows (139 tok/s here) and matmul-bound
            # from ~256 (260 tok/s); a 200-problem evaluation took ~113 s in 500-row chunks, ~124 s in 250 and
            # ~157 s in 1000.
            batch_size=500,
            max_new_tokens=24,  # the longest worked answer is 22 tokens + end-of-turn
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
        experiment_name="03_offline_lora",
        use_wandb=False,
        wandb_project="integration_training",
        mode="sft+rl",
        source_checkpoint=None,
    ),
)
