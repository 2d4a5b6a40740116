"""Training throughput and peak memory per rank, with and without activation checkpointing, in one process or under
torchrun with FSDP2: the figures the memory plan in docs/scaling.md (bench/memory_plan.py) estimates, measured.

    python bench/scale.py                                      # SmolLM2-135M shape, CPU, batch 4 x 256
    python bench/scale.py --shape llama-3.2-3b --device cuda --batch 8 --seq 512
    torchrun --nproc_per_node 8 bench/scale.py --shape llama-3.1-8b --device cuda --batch 8 --seq 512

One step is what sft.py runs: train.train_step (forward, answer-token CE divided by the global token count,
backward, clip 1.0; under torchrun the FSDP2 all-gathers and reduce-scatters) and AdamW. Random weights of the
named shape (built on the meta device and materialised after sharding, so an 8B model never exists whole on a
rank), random tokens, the last --answer-tokens of each sequence labelled. Both settings, activation checkpointing off
(the reference) and on, run in the same process on the same batches, alternating step by step so load from other
processes hits them alike; the ratios are on/off of the medians.

Peak memory: on CUDA torch.cuda.max_memory_allocated per setting (reset before each), the parameter, gradient and
optimiser memory included. On the CPU there is no allocator peak to read, so the figure is what activation
checkpointing changes: the bytes autograd stores for backward in one forward (saved-tensor hooks, each storage
counted once).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402
import train  # noqa: E402
from memory_plan import MODELS  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def build(shape: str, device: torch.device, n_layers: int | None) -> Transformer:
    s = MODELS[shape]
    args = ModelArgs(dim=s.dim, n_layers=n_layers or s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
                     head_dim=s.head_dim, hidden_dim=s.hidden_dim, vocab_size=s.vocab_size,
                     tie_word_embeddings=s.tied, rope_theta=500000.0)
    with torch.device("meta"):
        model = Transformer(args)
    model = runtime.shard(model, device)
    model.to_empty(device=device)
    if s.tied and model.lm_head.weight is not model.model.embed_tokens.weight:  # to_empty unties them in one
        model.lm_head.weight = model.model.embed_tokens.weight                 # process (FSDP keeps one param)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # under FSDP each rank fills its own shard
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(0, 0.02) if p.dim() >= 2 else local.fill_(1.0)
    model.init_rope(device)
    return model


def batch(args, vocab: int, device) -> dict:
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer_tokens:] = ids[:, -args.answer_tokens:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def stored_bytes(model, b: dict, dtype: str, device) -> int:
    """Bytes autograd keeps for backward in one forward + loss (each storage once; the bf16 copies autocast makes
    of the weights count, they live until backward)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # weights are not activations (FSDP's gathered ones neither)
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runtime.autocast(device, dtype):
        loss = train.sft_loss_sum(model, b)
    loss.backward()  # under FSDP the gradient reduce-scatter must run on every rank; the gradients are dropped
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(MODELS), default="smollm2-135m", help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="use only this many decoder layers (a quick look)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--answer-tokens", type=int, default=16, help="labelled tokens at the end of each sequence")
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting (after one warm-up step each)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if min(a.batch, a.seq, a.steps, a.answer_tokens) <= 0 or a.answer_tokens >= a.seq:
        raise runtime.UserError("--batch, --seq, --steps, --answer-tokens must be positive, --answer-tokens < --seq")
    device = runtime.resolve_device(a.device)
    runtime.init_distributed(device)
    dtype = runtime.resolve_dtype(a.dtype, device)
    model = build(a.shape, device, a.layers)
    optimizer = train.make_optimizer(model, 1e-5)
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the whole parameter's
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, peak = {False: [], True: []}, {}
    torch.manual_seed(1)
    batches = [batch(a, model.args.vocab_size, device) for _ in range(a.steps + 1)]
    for i, b in enumerate(batches):
        for ac in (False, True):
            model.set_activation_checkpointing(ac)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            loss, grad_norm, _ = train.train_step(model, [b], device, dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i > 0:  # the first step of each setting warms up kernels and allocator
                times[ac].append(time.perf_counter() - t0)
            if cuda:
                peak[ac] = max(peak.get(ac, 0), torch.cuda.max_memory_allocated(device))
    if not cuda:
        for ac in (False, True):
            model.set_activation_checkpointing(ac)
            peak[ac] = stored_bytes(model, batches[0], dtype, device)
    tokens = a.batch * a.seq
    what = "peak allocated" if cuda else "stored activations"
    runtime.print0(f"{a.shape}{f' ({a.layers} layers)' if a.layers else ''}: {n_params / 1e9:.3f}B params, "
                   f"{runtime.world()} rank(s) on {device.type}, {dtype}, batch {a.batch} x {a.seq} per rank, "
                   f"{a.answer_tokens} answer tokens per sequence, {a.steps} timed steps per setting")
    for ac in (False, True):
        t = statistics.median(times[ac])
        runtime.print0(f"  activation checkpointing {'on ' if ac else 'off'}: {t:.3f} s/step, "
                       f"{tokens / t:,.0f} tokens/s per rank, {what} {peak[ac] / 2**30:.3f} GiB per rank")
    runtime.print0(f"  on / off: step time {statistics.median(times[True]) / statistics.median(times[False]):.2f}x, "
                   f"{what} {peak[True] / peak[False]:.2f}x")


if __name__ == "__main__":
    runtime.run_cli(main)
