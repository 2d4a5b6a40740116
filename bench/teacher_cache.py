"""Distillation from the teacher cache against online distillation: one distill step on the same real batch, and the
peak RSS of distill.py with and without a teacher model in memory.

    python bench/teacher_cache.py --teacher runs/teacher/step_000126 --teacher-run runs/teacher

Step: the batch's items are cached from --teacher (teacher_cache.checkpoint_tensors, exact and top-k) into a temp
dir; then distill.distill_step + the optimiser step with the teacher model (online, the teacher forward included),
from the exact cache and from the top-k cache alternate --rounds times on the same batch, so load from other
processes hits all alike; the median of the per-round ratios cache / online is reported (target <= 0.75).
Whole runs (with --teacher-run): distill.py runs as a child process, SCD without AW over every checkpoint of that run,
--run-stages stages of --run-steps steps, no evaluation: loading its teachers (and filling a fresh probe cache, as
the first run on a teacher does), and from a top-k cache of them, built first and timed on its own. The two
alternate --repeats times; peak RSS (os.wait4) and wall time of each child are reported.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads, timed_rounds  # noqa: E402
import data  # noqa: E402
import distill  # noqa: E402
import teacher_cache  # noqa: E402
import train  # noqa: E402
from losses import KDTerm  # noqa: E402
from model import load_model  # noqa: E402
from runtime import run_cli  # noqa: E402
from runtime import save_tensors  # noqa: E402
from teachers import ModelTeacher  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def real_items(tok, task, n, batch_size, max_len):
    """The items of a median-length batch of the task's first n training examples, grouped as sft.py does."""
    items, _ = data.encode_split(tok, data.load_examples(task, "train", limit=n), max_len)
    batches = data.length_grouped_batches([len(it["input_ids"]) for it in items], batch_size, seed=0, epoch=0)
    batches.sort(key=lambda b: max(len(items[i]["input_ids"]) for i in b))
    return [items[i] for i in batches[len(batches) // 2]]


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", default="models/student", help="student model dir (trained)")
    p.add_argument("--teacher", default="models/teacher", help="teacher model dir or checkpoint (frozen)")
    p.add_argument("--teacher-run", default=None, help="teacher SFT run dir for the distill.py RSS runs (skipped "
                                                       "without it)")
    p.add_argument("--task", default="ncbi_disease", help="task whose training batch is used")
    p.add_argument("--batch-size", type=int, default=8, help="examples in the batch (cpu preset: 8)")
    p.add_argument("--max-len", type=int, default=256, help="truncate examples to this many tokens")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="as distill.py's --dtype")
    p.add_argument("--top-k", type=int, default=teacher_cache.DEFAULT_K, help="k of the top-k cache")
    p.add_argument("--aw", action=argparse.BooleanOptionalAction, default=True, help="AW weights (else alpha 0.5)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every variant once)")
    p.add_argument("--run-stages", type=int, default=2, help="stages of each whole distill.py run")
    p.add_argument("--run-steps", type=int, default=4, help="optimiser steps per stage of each whole run")
    p.add_argument("--run-train-size", type=int, default=64, help="training examples of the whole runs")
    p.add_argument("--repeats", type=int, default=2, help="whole runs of each kind, alternating")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    device = torch.device("cpu")
    tok = data.load_tokenizer(a.student)
    items = real_items(tok, a.task, 200, a.batch_size, a.max_len)
    batch = data.collate(items, tok.pad_id)
    student = load_model(a.student).train()
    teacher_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32  # as distill.py loads it
    teacher = load_model(a.teacher, dtype=teacher_dtype).requires_grad_(False).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    cached = {}
    for form in ("exact", "topk"):
        tensors = teacher_cache.checkpoint_tensors(teacher, items, tok.pad_id, form, a.top_k, "fp16", set(),
                                                   a.batch_size, device, a.dtype)
        save_tensors(tmp / f"{form}.safetensors", tensors, {})
        cached[form] = teacher_cache.CachedTeacher(tmp / f"{form}.safetensors", form, teacher.args.vocab_size)
    optimizer = train.make_optimizer(student, 1e-6)
    args = SimpleNamespace(loss="fkl", temperature=1.0, alpha=0.5, beta=0.5, lam=0.1, dtype=a.dtype)
    l_stu = torch.rand(a.batch_size) + 0.5
    stu_sft = (lambda ids: l_stu[:len(ids)]) if a.aw else None

    def step(source):
        def run():
            stats = distill.distill_step(student, source, stu_sft, KDTerm.of(args), [batch], args.alpha, device,
                                         a.dtype)
            train.apply_update(optimizer, 1e-6, 0, stats["loss"], stats["grad_norm"])
        return run

    runs = {"online": step(ModelTeacher(teacher, device, a.dtype)), "exact": step(cached["exact"]),
            "topk": step(cached["topk"])}
    B, T = batch["input_ids"].shape
    print(f"student {a.student} ({student.num_params() / 1e6:.1f}M), teacher {a.teacher} "
          f"({teacher.num_params() / 1e6:.1f}M, {a.dtype}); batch {B}x{T}, {train.n_answer_tokens(batch)} answer "
          f"tokens; fkl{' + AW' if a.aw else ''}; top-k k={a.top_k}; torch {torch.get_num_threads()} threads")
    times = timed_rounds(runs, a.rounds)
    for k, label in (("online", "online (teacher forward)"), ("exact", "from the exact cache (fp16)"),
                     ("topk", f"from the top-{a.top_k} cache (fp16)")):
        print(f"  {label:32s} {statistics.median(times[k]):6.3f} s  (rounds: "
              f"{', '.join(f'{x:.3f}' for x in times[k])})")
    for k in ("exact", "topk"):
        ratio = statistics.median(c / o for c, o in zip(times[k], times["online"]))
        print(f"{k} cache step / online step, median of per-round ratios: {ratio:.3f}x (target <= 0.75x)")
    del teacher, student, cached, optimizer

    if a.teacher_run:
        cache = tmp / "run_cache"
        size = ["--train-size", str(a.run_train_size), "--max-len", str(a.max_len), "--dtype", a.dtype,
                "--device", "cpu"]
        t0 = time.perf_counter()
        teacher_cache.main(["--teacher", a.teacher_run, "--out", str(cache), "--tokenizer", a.student, "--top-k",
                            str(a.top_k), "--task", a.task, *size])
        print(f"cache build: {time.perf_counter() - t0:.0f} s")
        common = [sys.executable, "distill.py", "--schedule", "scd", "--no-aw", "--teacher", a.teacher_run, "--init",
                  a.student, "--task", a.task, *size, "--val-size", "2", "--stages", str(a.run_stages),
                  "--stage-steps", str(a.run_steps), "--batch-size", str(a.batch_size), "--eval-split", "none",
                  "--overwrite"]
        found = {"online": [], "cache": []}
        for r in range(a.repeats):
            found["online"].append(peak_rss([*common, "--out", str(tmp / "online"), "--probe-cache",
                                             str(tmp / f"probe_cache_{r}")]))
            found["cache"].append(peak_rss([*common, "--out", str(tmp / "cached"), "--teacher-cache", str(cache)]))
        for k, label in (("online", "loading the teachers"), ("cache", f"from the top-{a.top_k} cache")):
            print(f"  distill.py {label:24s} peak RSS {', '.join(f'{m:.0f}' for m, _ in found[k])} MiB, wall "
                  f"{', '.join(f'{t:.0f}' for _, t in found[k])} s")
        med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in found.items()}
        print(f"distill.py ({a.run_stages} x {a.run_steps} steps, SCD, {a.run_train_size} examples), cache / online: "
              f"peak RSS {med['cache'][0] / med['online'][0]:.2f}x, wall {med['cache'][1] / med['online'][1]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
