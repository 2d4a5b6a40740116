"""Real-data epoch throughput: non-padding tokens/s of SFT steps with our length-grouped batches vs plain random ones.

    python bench/epoch_throughput.py                     # models/student, first 300 ncbi_disease train examples
    python bench/epoch_throughput.py --limit 120 --dtype fp32

Both sides run one epoch of the same examples through sft.py's own step (answer-only CE, backward, clip, AdamW) at
the same batch size: once in data.length_grouped_batches order (what sft.py and distill.py use), once in random
batches, each padded to its longest sequence as data.collate does. Steps of the two alternate, so load from other
processes on this machine hits both alike. Throughput counts only real (non-padding) tokens; the padding fraction
is the share of the padded (B, T) positions, i.e. of the body's compute, spent on padding.
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import load_model  # noqa: E402
from runtime import run_cli  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="models/student", help="HF Llama model dir that is trained")
    p.add_argument("--task", default="ncbi_disease", help="built-in task whose training split is used")
    p.add_argument("--limit", type=int, default=300, help="first N training examples (one epoch = all of them)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (sft.py's cpu preset: 8)")
    p.add_argument("--max-len", type=int, default=256, help="truncate examples to this many tokens")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="fp32 or bf16 autocast, as sft.py")
    p.add_argument("--seed", type=int, default=0, help="seed of both batch orders")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    device = torch.device("cpu")
    tok = data.load_tokenizer(a.model)
    items, _ = data.encode_split(tok, data.load_examples(a.task, "train", limit=a.limit), a.max_len)
    lengths = [len(it["input_ids"]) for it in items]
    perm = list(range(len(items)))
    random.Random(a.seed).shuffle(perm)
    orders = {"grouped": data.length_grouped_batches(lengths, a.batch_size, seed=a.seed, epoch=0),
              "random": [perm[i:i + a.batch_size] for i in range(0, len(perm), a.batch_size)]}
    model = load_model(a.model, device=device)
    optimizer = train.make_optimizer(model, 1e-5)
    model.train()

    def step(batch_idx):
        batch = data.collate([items[i] for i in batch_idx], tok.pad_id)
        loss, grad_norm, _ = train.train_step(model, [batch], device, a.dtype)
        train.apply_update(optimizer, 1e-5, 0, loss, grad_norm)

    print(f"{a.model} ({model.num_params() / 1e6:.1f}M params, {a.dtype}), {len(items)} {a.task} train examples "
          f"({sum(lengths) / len(lengths):.0f} tokens on average), batch {a.batch_size}, torch "
          f"{torch.get_num_threads()} threads")
    print("other processes share this CPU: steps of the two orders alternate")
    step(orders["random"][0])  # warm-up, untimed
    spent = {k: 0.0 for k in orders}
    for i in range(max(len(b) for b in orders.values())):
        for k, batches in orders.items():
            if i < len(batches):
                t0 = time.perf_counter()
                step(batches[i])
                spent[k] += time.perf_counter() - t0
    rate = {k: sum(lengths) / spent[k] for k in orders}
    for k, batches in orders.items():
        print(f"  {k:8s} batches: {len(batches):3d} steps, {spent[k]:6.1f} s, {rate[k]:7.1f} real tok/s, "
              f"padding {100 * data.padding_fraction(lengths, batches):5.1f}% of the padded positions")
    print(f"speed-up of length-grouped vs random batches: {rate['grouped'] / rate['random']:.2f}x "
          f"(target: padding <= 15% of compute)")


if __name__ == "__main__":
    run_cli(main)
