"""On-policy distillation data (GKD, Agarwal et al. 2024, ICLR): with probability λ a step's answers are the student's
own samples instead of the gold ones, so the student learns from the teacher on the states it reaches itself.

The sampled answer replaces the gold answer after the same prompt, and carries the labels; the teacher is then run on
those tokens (it must be a live model: a teacher cache holds the gold answers' positions only). Sampling is at
temperature 1 up to the task's generation cap, without gradient; whether a step is on-policy and what it samples are
drawn from generators seeded by (--seed, step), so a resumed run draws the same.
"""

import random

import torch

import data
import runtime
from generate import generate


class OnPolicy:
    """A step's micro-batches -> the same prompts with the student's sampled answers, with probability `lam`."""

    def __init__(self, lam: float, tok, max_new_tokens: int, seed: int, device, dtype: str = "fp32"):
        self.lam, self.tok, self.max_new, self.seed, self.device, self.dtype = (lam, tok, max_new_tokens, seed, device,
                                                                                 dtype)

    def __call__(self, micro: list[dict], student, step: int) -> list[dict]:
        if random.Random(f"on-policy-{self.seed}-{step}").random() >= self.lam:
            return micro
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)
        return [self.sample(batch, student, g) for batch in micro]

    @torch.no_grad()
    def sample(self, batch: dict, student, generator) -> dict:
        """One micro-batch's prompts with the student's answers sampled after them (end-of-turn included when the
        sample ended there), re-collated."""
        prompts = prompt_tokens(batch)
        was_training = student.training
        student.eval()
        with runtime.autocast(self.device, self.dtype):
            answers = generate(student, prompts, self.max_new, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                               temperature=1.0, generator=generator)
        student.train(was_training)
        items = []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            answer = a + [self.tok.eos_id] if len(a) < self.max_new else a  # a shorter sample stopped at its eos
            items.append({"id": batch["ids"][i], "input_ids": p + answer,
                          "labels": [data.IGNORE] * len(p) + answer})
        return data.collate(items, self.tok.pad_id)


def prompt_tokens(batch: dict) -> list[list[int]]:
    """Each row's tokens before its first labelled one: the prompt of an encoded example (data.encode_example)."""
    out = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        first = next(j for j, y in enumerate(labels) if y != data.IGNORE)
        out.append(ids[:first])
    return out
