"""Stage-boundary costs of SCD: loading a teacher checkpoint vs reading its bytes, and the probe's share of a run.

    python bench/ckpt_switch.py                          # models/teacher as the checkpoint, distill.py defaults
    python bench/ckpt_switch.py --checkpoint runs/teacher/step_000120 --dtype fp32

1. Load: model.load_model(ckpt, dtype) as distill.py does at every stage, followed by reading one float of every
   4 KiB page of every tensor, so lazily mmapped weights count as loaded; vs reading the file's bytes into memory
   (readinto a preallocated buffer). The file is in the page cache for both (a warm-up reads it first): a cold read
   is the disk's speed for both. Alternating, median of the per-round ratios (target <= 1.5x).
2. Probe share: what SCD adds to a distillation run at the default settings (--stages, --checkpoints,
   --steps per run): per stage a Scheduler.select (the student's forward over the probe set, Metric 2 against every
   checkpoint; the first also computes Metric 1) and once per checkpoint, ever, its probe cache entry (a teacher
   forward over the probe set; the cache is shared by runs). All checkpoints' cache entries here are the one
   checkpoint's, which costs the metrics the same. The run's wall time is modelled as stages x (select + load) +
   steps x distill step, each measured here (target: probe <= 5 %).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads  # noqa: E402
import data  # noqa: E402
import distill  # noqa: E402
import schedule  # noqa: E402
import train  # noqa: E402
from losses import KDTerm  # noqa: E402
from model import checkpoint_files, load_model  # noqa: E402
from runtime import run_cli  # noqa: E402
from teachers import ModelTeacher  # noqa: E402

PAGE_FLOATS = 1024  # 4 KiB of fp32; bf16 tensors are read at twice the needed density, which is harmless


def read_bytes(files: list[Path]) -> int:
    n = 0
    for f in files:
        buf = bytearray(f.stat().st_size)
        with open(f, "rb", buffering=0) as fh:
            n += fh.readinto(buf)
    return n


def load_and_touch(path, dtype) -> float:
    model = load_model(path, dtype=dtype)
    return float(sum(p.detach().reshape(-1)[::PAGE_FLOATS].float().sum() for p in model.parameters()))


class OneFileCache:
    """Stands in for a ProbeCache of many checkpoints: each of them answers with the one checkpoint's file."""

    def __init__(self, cache, step):
        self.cache, self.step = cache, step

    def load(self, step):
        return self.cache.load(self.step)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="models/teacher", help="teacher checkpoint dir (HF layout)")
    p.add_argument("--student", default="models/student", help="student model dir")
    p.add_argument("--task", default="ncbi_disease", help="task whose training split gives probe and batch")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="as distill.py's --dtype (the "
                                                                           "teacher is loaded in it)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the load comparison")
    p.add_argument("--stages", type=int, default=5, help="distillation stages (distill.py default)")
    p.add_argument("--checkpoints", type=int, default=10, help="teacher checkpoints (sft.py teacher default)")
    p.add_argument("--steps", type=int, default=375, help="optimiser steps of the run (cpu preset: 3 epochs x "
                                                          "125 steps of batch 8 over 1000 examples)")
    p.add_argument("--probe-size", type=int, default=32, help="SCD probe examples (distill.py default)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=16, help="batch size of the probe forwards")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    device = torch.device("cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    files = checkpoint_files(Path(a.checkpoint))
    size = sum(f.stat().st_size for f in files)
    print(f"checkpoint {a.checkpoint}: {size / 2 ** 20:.0f} MiB in {len(files)} file(s), loaded as {a.dtype}; "
          f"torch {torch.get_num_threads()} threads")
    print("other processes share this CPU: measurements alternate and medians are compared")

    read_bytes(files)  # warm the page cache
    load_and_touch(a.checkpoint, dtype)
    t_read, t_load = [], []
    for _ in range(a.rounds):
        t_read.append(timed(lambda: read_bytes(files))[0])
        t_load.append(timed(lambda: load_and_touch(a.checkpoint, dtype))[0])
    ratio = statistics.median(lo / r for lo, r in zip(t_load, t_read))
    read = statistics.median(t_read)
    print(f"  read file bytes        {read:6.3f} s  ({size / 2 ** 30 / read:.2f} GiB/s)")
    print(f"  load_model + touch     {statistics.median(t_load):6.3f} s")
    print(f"checkpoint load / file read, median of per-round ratios: {ratio:.2f}x (target <= 1.5x)")

    tok = data.load_tokenizer(a.student)
    items, _ = data.encode_split(tok, data.load_examples(a.task, "train", limit=1000), 256)
    probe = schedule.probe_items(items, a.probe_size, 0)
    student = load_model(a.student)
    with tempfile.TemporaryDirectory() as tmp:
        cache = schedule.ProbeCache(tmp, probe, [(1, Path(a.checkpoint))], a.dtype, device, tok.files)
        t_build, _ = timed(lambda: cache.build(tok.pad_id, a.eval_batch_size))
        steps = list(range(1, a.checkpoints + 1))
        index = {"steps": steps, "best": steps[-1], "final": steps[-1]}
        scheduler = schedule.Scheduler("scd", index, a.stages, OneFileCache(cache, 1), lambda f: f())
        def logp():
            return schedule.probe_logprobs(student, probe, tok.pad_id, a.eval_batch_size, device, a.dtype)
        t_first, _ = timed(lambda: scheduler.choose(0, 0, logp))
        t_select = statistics.median(timed(lambda s=s: scheduler.choose(s, s, logp))[0] for s in range(1, 4))

    batches = data.length_grouped_batches([len(it["input_ids"]) for it in items], a.batch_size, seed=0, epoch=0)
    teacher = load_model(a.checkpoint, dtype=dtype).requires_grad_(False).eval()
    optimizer = train.make_optimizer(student, 1e-6)
    args = SimpleNamespace(loss="fkl", temperature=1.0, alpha=0.5, beta=0.5, lam=0.1, dtype=a.dtype)
    l_stu = torch.rand(a.batch_size) + 0.5
    rng = torch.Generator().manual_seed(0)
    student.train()
    t_step = []
    for i in torch.randint(1, len(batches), (3,), generator=rng).tolist():  # random batches, not the longest
        batch = data.collate([items[k] for k in batches[i]], tok.pad_id)
        t, stats = timed(lambda b=batch: distill.distill_step(student, ModelTeacher(teacher, device, a.dtype),
                                                              lambda ids: l_stu[:len(ids)], KDTerm.of(args), [b],
                                                              args.alpha, device, a.dtype))
        train.apply_update(optimizer, 1e-6, 0, stats["loss"], stats["grad_norm"])
        t_step.append(t)
    step = statistics.median(t_step)
    load = statistics.median(t_load)
    probe_cost = t_first + (a.stages - 1) * t_select
    run = a.stages * load + a.steps * step + probe_cost
    print(f"  probe cache entry per checkpoint {t_build:6.2f} s (once per checkpoint, shared by runs)")
    print(f"  SCD select: first {t_first:.2f} s (with Metric 1), then {t_select:.2f} s per stage; "
          f"distill step {step:.2f} s (median of {len(t_step)})")
    print(f"modelled run ({a.stages} stages, {a.steps} steps, {a.checkpoints} checkpoints): {run / 60:.1f} min; "
          f"probe share {100 * probe_cost / run:.2f}% (target <= 5%), "
          f"{100 * (probe_cost + a.checkpoints * t_build) / (run + a.checkpoints * t_build):.2f}% with building the "
          f"probe cache in this run; teacher loads {100 * a.stages * load / run:.2f}%")


if __name__ == "__main__":
    run_cli(main)
