"""nanochat's reference mixtures on Qwen2.5-0.5B-Instruct, 4 GPUs with DDP.

SFT (as nanochat's chat_sft): ARC-Easy 2.3K, ARC-Challenge 1.1K, GSM8K 8K, SmolTalk 10K, identity 1K, spelling 600.
RL (as nanochat's chat_rl): GSM8K main train, 8K problems. Hub sources are downloaded at run time.
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
        gpu_ranks=[0, 1, 2, 3],
        device_type="cuda",
        processes_per_node=4,
        parallelism="ddp",
        num_nodes=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=29500,
    ),
    model=ModelConfig(
        name="Qwen/Qwen2.5-0.5B-Instruct",
        dtype="bfloat16",  # compute dtype: forwards under bf16 autocast; weights, grads and AdamW state stay fp32
        compile=True,
        attn_implementation="sdpa",  # packed rows get a block mask; "flash_attention_2" (CUDA) uses its varlen path
        gradient_checkpointing=False,
        lora=None,  # full fine-tune (configs/03_offline_lora.py trains LoRA adapters)
    ),
    data=DataConfig(
        sft_mixture=[
            DatasetSpec(name="allenai/ai2_arc", split="train", subset="ARC-Easy", max_samples=2300, repeat=1, path=None, reward=None),
            DatasetSpec(name="allenai/ai2_arc", split="train", subset="ARC-Challenge", max_samples=1100, repeat=1, path=None, reward=None),
            DatasetSpec(name="openai/gsm8k", split="train", subset="main", max_samples=8000, repeat=1, path=None, reward=None),
            DatasetSpec(name="HuggingFaceTB/smol-smoltalk", split="train", subset=None, max_samples=10_000, repeat=1, path=None, reward=None),
            # nanochat repeats its small identity set to ~1K rows; ours ships a few dozen conversations.
            DatasetSpec(name="custom_json", split="train", subset=None, max_samples=None, repeat=30, path="configs/data/identity.jsonl", reward=None),
            DatasetSpec(name="spelling", split="train", subset=None, max_samples=600, repeat=1, path=None, reward=None),
        ],
        sft_val_mixture=[
            DatasetSpec(name="HuggingFaceTB/smol-smoltalk", split="test", subset=None, max_samples=1000, repeat=1, path=None, reward=None),
        ],
        rl_mixture=[
            DatasetSpec(name="openai/gsm8k", split="train", subset="main", max_samples=8000, repeat=1, path=None, reward=None),
        ],
        max_length=1024,
        shuffle_seed=42,
        # On, as nanochat: the 8K GSM8K SFT rows keep their `<<48/2=24>>` annotations (mask 0 on the forced `24>>`),
        # so the model learns to call the calculator, and RL and evaluation force its results the same way.
        tools=["calculator"],  # [] = no tool calls; ["calculator"] = <<EXPR=RESULT>> computed by the engine
    ),
    sft=SFTConfig(
        num_epochs=1,
        num_iterations=-1,
        batch_size=4,
        examples_per_step=32,
        optimizer=OptimizerConfig(
            name="adamw",
            # nanochat's SFT LRs are for Muon on a from-scratch model; fine-tuning a pretrained HF model wants
            # AdamW ~2e-5.
            embedding_lr=2e-5,
            unembedding_lr=2e-5,
            matrix_lr=2e-5,
            weight_decay=0.0,
            init_lr_frac=1.0,
            warmup_ratio=0.03,
            lr_schedule="linear",
            grad_clip=1.0,
        ),
        packing=True,
        eval_every=100,
        eval_steps=50,
        checkpoint_every=200,
        log_every=10,
    ),
    rl=RLConfig(
        num_epochs=1,
        num_iterations=-1,
        examples_per_step=16,
        num_samples=16,
        batch_size=8,
        sampling=SamplingConfig(
            batch_size=256,  # sampling holds no activations: batch wider than training
            max_new_tokens=256,
            temperature=1.0,
            top_k=50,
        ),
        optimizer=OptimizerConfig(
            name="adamw",
            embedding_lr=1e-6,
            unembedding_lr=1e-6,
            matrix_lr=1e-6,
            weight_decay=0.0,
            init_lr_frac=1.0,
            warmup_ratio=0.0,
            lr_schedule="linear",
            grad_clip=1.0,
        ),
        advantage="mean",
        kl_coef=0.0,
        clip_eps=0.2,
        updates_per_batch=1,
        checkpoint_every=60,
        log_every=1,
    ),
    evaluation=EvalConfig(
        mixture=[
            DatasetSpec(name="openai/gsm8k", split="test", subset="main", max_samples=400, repeat=1, path=None, reward=None),
        ],
        num_problems=400,
        num_samples=8,
        sampling=SamplingConfig(
            batch_size=256,  # sampling holds no activations: batch wider than training
            max_new_tokens=256,
            temperature=1.0,
            top_k=50,
        ),
        at_start=True,
        after_sft=True,
        after_rl=True,
        every_rl_steps=60,
    ),
    output=OutputConfig(
        save_dir=Path("./results"),
        log_level="INFO",
        experiment_name="02_nanochat_reference",
        use_wandb=False,
        wandb_project="integration_training",
        mode="sft+rl",
        source_checkpoint=None,
    ),
)
