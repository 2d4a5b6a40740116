"""Peak memory of distill.py's chunked divergences vs the same loss on the whole (N, V) at once, forward + backward.

    python bench/kl_memory.py                            # vocab 128256 (Llama 3), 4096 answer tokens, forward KL
    python bench/kl_memory.py --tokens 1024 --loss jsd

Both variants compute losses.token_losses (divergence and gold CE per answer token, the student's LM head applied
inside) from the same inputs: student hidden states h (N, D) and head weight (V, D) with gradients, teacher logits
(N, V) without. "chunked" is what distill.py runs (losses.chunk_rows rows at a time under activation
checkpointing); "naive" passes rows=N, so the head's logits, both log-softmaxes and every temporary exist for all N
rows at once. Loss = sum of 0.5 * KD + 0.5 * CE, then backward.

How memory is measured: each variant runs in a fresh subprocess, which reads its resident set size (RSS) once the
inputs exist and its RSS high-water mark (getrusage ru_maxrss) after backward; the difference is the peak that
the loss and its backward add. This counts every byte the process touches, whichever allocator made it:
PyTorch's CPU allocator does not cache, and tensors this large are mmapped and returned to the kernel when freed,
so the RSS follows the live tensors. (tracemalloc cannot see torch's allocations; a fresh process keeps one
variant's high-water mark from hiding the other's.) The child's address space is capped near the memory available
at start, so a variant that does not fit fails with an allocation error instead of waking the OOM killer.
Values and gradients of the two are compared in fp32.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import set_threads  # noqa: E402
from runtime import UserError, run_cli  # noqa: E402

GB = 1024 ** 3


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vsize() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def run_variant(a):
    """In the child: build the inputs, run forward + backward of one variant, write stats and gradients."""
    from safetensors.torch import save_file

    import losses

    set_threads(a.threads)
    torch.manual_seed(0)
    N, V, D = a.tokens, a.vocab, a.dim
    h = torch.randn(N, D).requires_grad_()
    w = torch.randn(V, D).mul_(D ** -0.5).requires_grad_()
    teacher = torch.randn(N, V).mul_(2.0)  # in place: no second (N, V) buffer during setup
    labels = torch.randint(0, V, (N,))
    base = rss()
    if a.as_limit:
        resource.setrlimit(resource.RLIMIT_AS, (vsize() + a.as_limit, resource.RLIM_INFINITY))
    rows = N if a.variant == "naive" else losses.chunk_rows(V)
    t0 = time.perf_counter()
    try:
        kd, ce = losses.token_losses(h, lambda x: x @ w.t(), teacher, labels, a.loss, rows=rows)
        loss = (0.5 * kd + 0.5 * ce).sum()
        loss.backward()
    except RuntimeError as e:  # over the cap: report, do not crash the machine
        stats = {"error": str(e).splitlines()[0][:200]}
    else:
        stats = {"loss": float(loss), "rows": rows, "seconds": time.perf_counter() - t0}
        save_file({"h": h.grad, "w": w.grad, "kd": kd.detach(), "ce": ce.detach()},
                  str(Path(a.out) / "grads.safetensors"))
    stats.update(base=base, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    (Path(a.out) / "stats.json").write_text(json.dumps(stats))


def spawn(a, variant, out) -> dict:
    limit = max(mem_available() - 2 * GB, GB)  # leave the other processes on this machine their memory
    cmd = [sys.executable, __file__, "--variant", variant, "--out", str(out), "--tokens", str(a.tokens),
           "--vocab", str(a.vocab), "--dim", str(a.dim), "--loss", a.loss, "--threads", str(a.threads),
           "--as-limit", str(limit)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        raise UserError(f"{variant} run failed: {last}")
    return {**json.loads((Path(out) / "stats.json").read_text()), "limit": limit}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="answer tokens N in the batch")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (Llama 3: 128256)")
    p.add_argument("--dim", type=int, default=576, help="hidden size D of the student's LM head")
    p.add_argument("--loss", default="fkl", help="divergence of distill.py: fkl, rkl, jsd, skew_fkl, skew_rkl, tvd")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--variant", choices=["chunked", "naive"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--as-limit", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        return run_variant(a)
    from safetensors.torch import load_file

    nv = a.tokens * a.vocab * 4 / GB
    print(f"{a.loss} + CE over N={a.tokens} answer tokens, V={a.vocab}, D={a.dim}: one fp32 (N, V) tensor is "
          f"{nv:.2f} GiB; inputs (teacher logits, h, head) are allocated before the baseline RSS")
    res, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("chunked", "naive"):
            out = Path(tmp) / variant
            out.mkdir()
            res[variant] = spawn(a, variant, out)
            if "error" not in res[variant]:
                grads[variant] = load_file(str(out / "grads.safetensors"))
    for variant, r in res.items():
        if "error" in r:
            print(f"  {variant:8s} did not fit under {r['limit'] / GB:.1f} GiB: {r['error']}")
        else:
            print(f"  {variant:8s} rows/slice {r['rows']:5d}  peak above inputs {(r['peak'] - r['base']) / GB:6.2f} "
                  f"GiB  (= {(r['peak'] - r['base']) / GB / nv:4.1f} x one (N, V) fp32)  {r['seconds']:6.1f} s  "
                  f"loss {r['loss']:.6f}")
    if len(grads) == 2:
        c, n = res["chunked"], res["naive"]
        print(f"peak memory chunked / naive: {(c['peak'] - c['base']) / (n['peak'] - n['base']):.3f}  "
              f"(time chunked / naive: {c['seconds'] / n['seconds']:.2f}x)")
        diff = {k: float((grads["chunked"][k] - grads["naive"][k]).abs().max()) for k in grads["naive"]}
        scale = {k: float(grads["naive"][k].abs().max()) for k in grads["naive"]}
        print("equal values and grads (max |chunked - naive| / max |naive|): "
              + ", ".join(f"{k} {diff[k] / max(scale[k], 1e-30):.1e}" for k in diff)
              + f"; loss rel. diff {abs(c['loss'] - n['loss']) / abs(n['loss']):.1e}")


if __name__ == "__main__":
    run_cli(main)
