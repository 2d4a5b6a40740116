"""Training throughput of our Llama vs transformers' LlamaForCausalLM, same config, batch, precision and optimiser.

    python bench/train_throughput.py                     # SmolLM2-135M shape, batch 4 x 256, fp32 and bf16
    python bench/train_throughput.py --layers 6 --steps 3           # a quick look
    python bench/train_throughput.py --device cuda --batch-size 8 --seq-len 512

One full train step = forward, loss, backward, clip, AdamW(0.9, 0.95). Both models start from the same random
weights and get the same optimiser (train.make_optimizer, or fused AdamW for both with --fused-adamw). Steps
alternate between the variants so that load from other processes hits all alike; each speed-up is the median of
the per-round time ratios. Our variants:
  full    the LM head and CE over every position, exactly the work transformers does (apples to apples);
  answer  the LM head only where a label exists, as sft.py trains (the last --answer-tokens of each sequence:
          domain SFT answers are short, NCBI averages ~6 answer tokens after ~90 prompt tokens).
MFU = model FLOPs / time / matmul peak, the peak measured here in the same run (the best of 1024^2, 2048^2 and
4096^2 matmuls, same dtype).
Model FLOPs per step = tokens * (6 * non-embedding params + 12 * layers * seq_len * heads * head_dim) + 6 * dim *
vocab * (positions the LM head runs at), i.e. PaLM's count with the head counted where it actually runs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from runtime import run_cli  # noqa: E402
from train import answer_logits, make_optimizer  # noqa: E402

SMOLLM2_135M = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152,
                    norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
LABELS = {"hf": "transformers", "full": "ours, full logits", "answer": "ours, answer-only head"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, sizes=(1024, 2048, 4096), seconds=1.0) -> float:
    """The best FLOP/s of square matmuls over a few sizes: one size alone can sit well below what the model's own
    matmuls reach (2048 gave 72 GFLOP/s on an AMD EPYC whose 1024 gave 87), and MFU would pass 100 %."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ b
            k += 1
        sync(device)
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
    return best


def hf_model(args: ModelArgs, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device)


def make_batch(args, B, T, n_answer, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    labels[:, T - n_answer:] = ids[:, T - n_answer:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(B, T, dtype=torch.bool, device=device),
            "labels": labels.to(device)}


def step_flops(args: ModelArgs, B, T, head_positions) -> float:
    """Model FLOPs of one train step (forward + backward) with the LM head run at head_positions positions."""
    attn = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + args.n_heads * args.head_dim * args.dim
    n_body = args.n_layers * (attn + 3 * args.dim * args.hidden_dim + 2 * args.dim) + args.dim
    per_token = 6 * n_body + 12 * args.n_layers * T * args.n_heads * args.head_dim
    return B * T * per_token + 6 * args.dim * args.vocab_size * head_positions


def optimizer(model, fused: bool):
    if fused:  # fused AdamW has CPU and CUDA kernels; transformers' Trainer uses it by default on torch >= 2.8
        return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return make_optimizer(model, 1e-5)


def step_fn(kind, model, opt, batch, device, bf16):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if kind == "hf":
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            elif kind == "full":  # shift the labels, not the (B, T, V) logits: slicing those copies them
                logits = model(batch["input_ids"])
                labels = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
            else:
                logits, labels, _ = answer_logits(model, batch)
                loss = F.cross_entropy(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
    return step


def bench(precision, args, batch, device, a):
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    ours = Transformer(args).to(device)
    hf = hf_model(args, device)
    hf.load_state_dict(ours.state_dict(), strict=False)  # same weights (HF has no rope buffers in its state)
    if a.compile:  # each decoder layer on its own: one small graph that all layers share, compiled in seconds
        for layer in ours.model.layers:
            layer.compile()
    runs = {"hf": step_fn("hf", hf, optimizer(hf, a.fused_adamw), batch, device, bf16),
            "full": step_fn("full", ours, optimizer(ours, a.fused_adamw), batch, device, bf16),
            "answer": step_fn("answer", ours, optimizer(ours, a.fused_adamw), batch, device, bf16)}
    times = {k: [] for k in runs}
    for i in range(a.warmup + a.steps):
        for k, fn in runs.items():  # interleaved, so background load hits every variant alike
            t0 = time.perf_counter()
            fn()
            if i >= a.warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--answer-tokens", type=int, default=16, help="labelled tokens at the end of each sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast, both models)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--fused-adamw", action="store_true",
                   help="fused AdamW for both models instead of train.make_optimizer (which fuses on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile each of our decoder layers")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    device = torch.device(a.device)
    args = ModelArgs(**SMOLLM2_135M)
    if a.layers:
        args.n_layers = a.layers
    batch = make_batch(args, a.batch_size, a.seq_len, a.answer_tokens, device)
    B, T = a.batch_size, a.seq_len
    head = {"hf": B * T, "full": B * T, "answer": B * a.answer_tokens}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {B}x{T}, "
          f"{args.n_layers} layers, optimiser {'fused AdamW' if a.fused_adamw else 'train.make_optimizer'}"
          f"{', our layers compiled' if a.compile else ''}")
    print("other processes share this machine: variants alternate step by step, medians are compared")
    for precision in a.precision.split(","):
        peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        times = bench(precision, args, batch, device, a)
        print(f"\n[{precision}] matmul peak {peak / 1e9:.0f} GFLOP/s")
        for k, label in LABELS.items():
            t = statistics.median(times[k])
            ratio = statistics.median(h / x for h, x in zip(times["hf"], times[k]))
            mfu = step_flops(args, B, T, head[k]) / t / peak
            print(f"  {label:24s} {t:7.3f} s/step  {B * T / t:8.1f} tok/s  MFU {100 * mfu:5.1f}%  "
                  f"speed-up vs transformers {ratio:.2f}x")


if __name__ == "__main__":
    run_cli(main)
