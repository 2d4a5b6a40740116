"""x @ W.T for few rows: F.linear against model.Linear's decode path, (W @ x.T).T, over a real model's weights.

    python bench/linear_rows.py --model runs/teacher/step_000126 --threads 2

Every linear weight of the model (all layers, then the LM head) is applied once per round to an input of R rows, as
one decode step at batch R would; the weights do not fit in the CPU caches, as in real decoding. The two ways
alternate, --rounds times, and the median of the per-round time ratios is printed per row count. model.Linear takes
the (W @ x.T).T path for 2-48 rows (fp32, CPU, no grad): this shows whether that pays on your CPU.
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
from model import load_model  # noqa: E402
from runtime import run_cli  # noqa: E402


def step(weights, inputs, fn):
    t0 = time.perf_counter()
    for w in weights:
        fn(inputs[w.shape[1]], w)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="models/teacher", help="HF Llama model dir")
    p.add_argument("--rows", default="1,2,4,8,16,32,48,64,128", help="comma-separated row counts")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per row count")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    model = load_model(a.model)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # layers in order, LM head last
    ways = {"F.linear": lambda x, w: F.linear(x, w), "(W @ x.T).T": lambda x, w: torch.mm(w, x.t()).t()}
    print(f"{a.model}: {len(weights)} weights, {sum(w.numel() for w in weights) * 4 / 2**20:.0f} MiB fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.no_grad():
        for rows in map(int, a.rows.split(",")):
            inputs = {d: torch.randn(rows, d) for d in {w.shape[1] for w in weights}}
            times = {k: [] for k in ways}
            for k, fn in ways.items():  # warm-up
                step(weights, inputs, fn)
            for _ in range(a.rounds):
                for k, fn in ways.items():
                    times[k].append(step(weights, inputs, fn))
            ratio = statistics.median(x / y for x, y in zip(times["F.linear"], times["(W @ x.T).T"]))
            print(f"  rows {rows:4d}: F.linear {statistics.median(times['F.linear']) * 1e3:7.1f} ms, "
                  f"(W @ x.T).T {statistics.median(times['(W @ x.T).T']) * 1e3:7.1f} ms: {ratio:.2f}x")


if __name__ == "__main__":
    run_cli(main)
