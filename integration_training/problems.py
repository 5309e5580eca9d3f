"""Prompt problems with verifiers — what RL trains on and what evaluation scores — and the length check they share.

Both stages take a mixture of `Example`s whose last message is the reference answer, keep those with a verifier,
and leave out the prompts that cannot fit their generation budget; the two checks live here so that RL, the
evaluation stage, the plan (`--dry-run`) and the probe make them with the same messages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from integration_training.data.types import Example
from integration_training.errors import UserError

logger = logging.getLogger(__name__)


def verified_problems(specs, seed: int, field: str, tools: Sequence[str] = ()) -> list[Example]:
    """The mixture `specs` (named `field` in messages, e.g. "data.rl_mixture"); every source needs a verifier."""
    from integration_training.data import build_mixture

    examples = build_mixture(specs, seed, tools).examples
    missing = sorted({e.source for e in examples if e.reward is None})
    if missing:
        raise UserError(
            f"{field}: {', '.join(missing)} has no verifier (reward=None); RL and evaluation need a task with "
            "answers or DatasetSpec.reward='module:function'"
        )
    if not examples:
        raise UserError(f"{field}: no examples")
    return examples


def drop_overlong(examples: list[Example], tokenizer, max_length: int, sampling, what: str) -> list[Example]:
    """Prompts that cannot fit prompt + sampling.max_new_tokens in max_length are reported (count) and left out.

    `sampling`: the SamplingConfig the prompts are sampled with; `what`: the section holding both the mixture and
    `sampling` ("rl" for data.rl_mixture, "evaluation" for evaluation.mixture), for messages.
    """
    from integration_training.template import render_prompt

    mixture = {"rl": "data.rl_mixture", "evaluation": "evaluation.mixture"}[what]
    budget = max_length - sampling.max_new_tokens
    kept = [e for e in examples if len(render_prompt(tokenizer, list(e.messages[:-1]))) <= budget]
    if len(kept) < len(examples):
        logger.warning("%s: %d of %d prompts exceed data.max_length - %s.sampling.max_new_tokens = %d tokens; left out",
                       mixture, len(examples) - len(kept), len(examples), what, budget)
    if not kept:
        raise UserError(f"{mixture}: every prompt is longer than data.max_length - {what}.sampling.max_new_tokens = "
                        f"{budget} tokens; raise data.max_length or lower {what}.sampling.max_new_tokens")
    return kept


def rl_problems(config, tokenizer) -> list[Example]:
    """RL's training prompts: data.rl_mixture's verified problems that fit data.max_length with rl.sampling."""
    problems = verified_problems(config.data.rl_mixture, config.data.shuffle_seed, "data.rl_mixture",
                                 config.data.tools)
    return drop_overlong(problems, tokenizer, config.data.max_length, config.rl.sampling, "rl")


def held_out_problems(config, tokenizer) -> list[Example]:
    """The first `evaluation.num_problems` problems of `evaluation.mixture` that fit the generation budget."""
    evaluation = config.evaluation
    problems = verified_problems(evaluation.mixture, config.data.shuffle_seed, "evaluation.mixture",
                                 config.data.tools)
    problems = drop_overlong(problems, tokenizer, config.data.max_length, evaluation.sampling, "evaluation")
    return problems[: evaluation.num_problems]


def rl_steps(rl, num_examples: int) -> int:
    """RL's step count: num_iterations, or (-1) enough steps to see the RL mixture num_epochs times.

    Here rather than in rl.py so that the plan (`--dry-run`) can count steps without importing the trainer.
    """
    if rl.num_iterations != -1:
        return rl.num_iterations
    steps = (rl.num_epochs * num_examples) // rl.examples_per_step
    if steps < 1:
        raise UserError(
            f"rl.num_iterations=-1: {rl.num_epochs} epoch(s) of {num_examples} RL prompts is fewer than one step of "
            f"rl.examples_per_step={rl.examples_per_step}; use more data or set num_iterations"
        )
    return steps
