"""Decoding that stops a looping answer (evaluate.py --stop-repeats) against decoding to the token cap, on one real
model and the same test sentences in one run: the wall time of each and their ratio, the F1 of each, and whether the
stopped answers are exactly the full answers cut at their first repeated line (greedy tokens before the stop are
unchanged).

    python bench/stopped_decode.py --model runs/experiment/ncbi_disease/student_s0/step_000189
    python bench/stopped_decode.py --model models/teacher --n 200 --rounds 1     # the zero-shot teacher loops most

Rounds alternate the two decoders, so a machine busy with other work slows both alike; the median of the per-round
ratios stopped / strict is printed.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
from model import load_model  # noqa: E402
from runtime import resolve_dtype, run_cli  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="models/teacher", help="model dir (HF layout) to decode with")
    p.add_argument("--task", default="ncbi_disease", help="a task whose answers are generated")
    p.add_argument("--n", type=int, default=100, help="test sentences (the first N)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (the experiment's)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="as the experiment's evaluation")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds, each decoding both ways")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    import torch
    device = torch.device("cpu")
    dtype = resolve_dtype(a.dtype, device)
    tok = data.load_tokenizer(a.model)
    examples = data.load_examples(a.task, "test", limit=a.n)
    model = load_model(a.model)
    times, runs = {"strict": [], "stopped": []}, {}
    for _ in range(a.rounds):
        for name in times:
            t0 = time.perf_counter()
            runs[name] = evaluate.evaluate(model, tok, a.task, examples, a.batch_size, dtype=dtype,
                                           stop_repeats=name == "stopped")
            times[name].append(time.perf_counter() - t0)
    strict = [r["prediction"] for r in runs["strict"][1]]
    stopped = [r["prediction"] for r in runs["stopped"][1]]
    cut = [data.cut_repeats(x) for x in strict]
    same = sum(s == c for s, c in zip(stopped, cut))
    cut_f1 = data.score(a.task, examples, cut)["main"]
    print(f"{a.model}: {len(examples)} {a.task} test sentences, batch {a.batch_size}, {dtype}, {a.rounds} rounds")
    for name in times:
        m = runs[name][0]
        print(f"  {name:8s} {statistics.median(times[name]):7.1f} s  F1 {m['main']:.4f}"
              + (f"  ({m['stopped']} answers stopped)" if "stopped" in m else ""))
    ratio = statistics.median(s / t for s, t in zip(times["stopped"], times["strict"]))
    print(f"stopped / strict wall time, median of per-round ratios: {ratio:.3f}x")
    print(f"stopped answers equal to the strict answers cut at their first repeated line: {same} of {len(cut)}; "
          f"F1 of the cut strict answers {cut_f1:.4f}")
    for s, c, x in zip(stopped, cut, strict):
        if s != c:
            print(f"  differs: stopped {s!r}\n           cut     {c!r}\n           strict  {x[:200]!r}")


if __name__ == "__main__":
    run_cli(main)
