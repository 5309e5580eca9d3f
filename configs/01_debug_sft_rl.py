"""The seed's debug run: Qwen2.5-0.5B-Instruct on one GPU, SFT 100 steps on 1K SmolTalk rows, RL on 500 GSM8K problems.

Needs a CUDA GPU and the HF hub (model and datasets are downloaded at run time). ~15-20 minutes on one GPU.
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
        gpu_ranks=[0],
        device_type="cuda",
        processes_per_node=1,
        parallelism="none",
        num_nodes=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=29500,
    ),
    model=ModelConfig(
        name="Qwen/Qwen2.5-0.5B-Instruct",
        dtype="bfloat16",  # compute dtype: forwards under bf16 autocast; weights, grads and AdamW state stay fp32
        compile=False,
        attn_implementation="sdpa",  # packed rows get a block mask; "flash_attention_2" (CUDA) uses its varlen path
        gradient_checkpointing=False,
        lora=None,  # full fine-tune (configs/03_offline_lora.py trains LoRA adapters)
    ),
    data=DataConfig(
        sft_mixture=[
            DatasetSpec(
                name="HuggingFaceTB/smol-smoltalk",
                split="train",
                subset=None,
                max_samples=1000,
                repeat=1,
                path=None,
                reward=None,
            ),
        ],
        sft_val_mixture=[
            DatasetSpec(
                name="HuggingFaceTB/smol-smoltalk",
                split="test",
                subset=None,
                max_samples=200,
                repeat=1,
                path=None,
                reward=None,
            ),
        ],
        rl_mixture=[
            DatasetSpec(name="openai/gsm8k", split="train", subset="main", max_samples=500, repeat=1, path=None, reward=None),
        ],
        max_length=512,
        shuffle_seed=42,
        # Off: this SFT is SmolTalk only, so nothing teaches the model to write `<<EXPR=`; with the calculator on, RL
        # would only see it forced where the model emitted `<<…=` by chance. configs/02 (GSM8K in SFT) turns it on.
        tools=[],  # [] = no tool calls; ["calculator"] = <<EXPR=RESULT>> computed by the engine
    ),
    sft=SFTConfig(
        num_epochs=1,
        num_iterations=100,
        batch_size=2,
        examples_per_step=8,
        optimizer=OptimizerConfig(
            name="adamw",
            # AdamW LRs for fine-tuning a pretrained instruct model (nanochat's Muon LRs are for from-scratch training).
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
        eval_every=25,
        eval_steps=10,
        checkpoint_every=50,
        log_every=1,
    ),
    rl=RLConfig(
        num_epochs=1,
        num_iterations=-1,
        examples_per_step=16,
        num_samples=8,
        batch_size=16,
        sampling=SamplingConfig(
            batch_size=128,  # sampling holds no activations: batch wider than training
            max_new_tokens=256,
            temperature=1.0,
            top_k=50,
        ),
        optimizer=OptimizerConfig(
            name="adamw",
            # RL at a small fraction of SFT's LR, as nanochat does (its RL runs at 0.05 of the base LR).
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
        checkpoint_every=10,
        log_every=1,
    ),
    evaluation=EvalConfig(
        mixture=[
            DatasetSpec(name="openai/gsm8k", split="test", subset="main", max_samples=200, repeat=1, path=None, reward=None),
        ],
        num_problems=200,
        num_samples=4,
        sampling=SamplingConfig(
            batch_size=128,  # sampling holds no activations: batch wider than training
            max_new_tokens=256,
            temperature=1.0,
            top_k=50,
        ),
        at_start=True,
        after_sft=True,
        after_rl=True,
        every_rl_steps=10,
    ),
    output=OutputConfig(
        save_dir=Path("./results"),
        log_level="INFO",
        experiment_name="01_debug_sft_rl",
        use_wandb=False,
        wandb_project="integration_training",
        mode="sft+rl",
        source_checkpoint=None,
    ),
)
