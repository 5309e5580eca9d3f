"""Quick speed check of `rollout.sample` vs HF `generate` on SmolLM2-135M-Instruct (offline copy).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_rollout.py [--device cpu|cuda] [--dtype float32|bfloat16]

Both engines get the same chat-rendered prompts and generate exactly `max_new_tokens` tokens (no stop ids), so
tokens/s compare like for like. HF generate gets num_return_sequences=samples (it re-prefills every copy).
"""

from __future__ import annotations

import argparse
import time

import torch

from integration_training.models import load_model, load_tokenizer, provision_offline_model
from integration_training.rollout import SamplingSettings, SpecialTokens, left_pad, sample

QUESTIONS = [
    "What is 12 + 35?", "Compute 7 * 8.", "What is 100 - 37?", "How many legs do 3 spiders have?",
    "What is 144 divided by 12?", "Add 19 and 23.", "What is 9 squared?", "What is half of 86?",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = QUESTIONS[i % len(QUESTIONS)] + (f" (case {i})" if i >= len(QUESTIONS) else "")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out.append(list(ids))
    return out


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ours(model, prompts, samples, new_tokens, pad_id, device, batch_size):
    gen = torch.Generator(device=device).manual_seed(0)
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, top_k=0, batch_size=batch_size)
    return sample(model, prompts, num_samples=samples, settings=settings,
                  special=SpecialTokens(stop_ids=frozenset(), pad_id=pad_id), generator=gen, greedy_first=False)


def _hf(model, prompts, samples, new_tokens, pad_id, device):
    from transformers import GenerationConfig

    ids, mask, _ = left_pad(prompts, pad_id, device)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, num_return_sequences=samples, pad_token_id=pad_id,
                              eos_token_id=None)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    path = str(provision_offline_model())
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, "sdpa", args.device, training=False).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    _ours(model, _prompts(tokenizer, 2), 2, 4, tokenizer.pad_token_id, args.device, 64)  # warm-up
    for n_prompts, samples, new_tokens in [(8, 8, 32), (64, 1, 32)]:
        prompts = _prompts(tokenizer, n_prompts)
        total = n_prompts * samples * new_tokens
        ours, hf = [], []
        # Interleaved repeats, best of each: the CPU may be shared, and the minimum is the least disturbed run.
        for _ in range(args.repeats):
            ours.append(_time(lambda: (_ours(model, prompts, samples, new_tokens, tokenizer.pad_token_id,
                                             args.device, args.batch_size), sync())))
            if not args.skip_hf:
                hf.append(_time(lambda: (_hf(model, prompts, samples, new_tokens, tokenizer.pad_token_id,
                                             args.device), sync())))
        line = f"{n_prompts} prompts x {samples} samples x {new_tokens} tokens: rollout.sample {min(ours):.2f}s " \
               f"({total / min(ours):.0f} tok/s)"
        if hf:
            line += f" | HF generate {min(hf):.2f}s ({total / min(hf):.0f} tok/s) | speed-up {min(hf) / min(ours):.1f}x"
        print(line, flush=True)

if __name__ == "__main__":
    main()
