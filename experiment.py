"""The paper's comparison on one task, end to end, with a report (arXiv 2601.10114, Sec. 4).

    python experiment.py                                   # ncbi_disease, 1 seed, cpu preset
    python experiment.py --task pubmedqa --seeds 3         # three students per variant, one teacher
    python experiment.py --preset gpu --task ncbi_disease  # the paper's sizes
    python experiment.py --quick                           # tiny random models, whole pipeline in ~1 minute
    python experiment.py --variants scd_aw_from_sft,td_from_sft   # distil the SFT student instead of the base one
    python experiment.py --task jsonl --data train.jsonl,val.jsonl,test.jsonl   # your own task (see data.py)

Stages, each skipped when its output is already complete (and resumed when it was interrupted); the settings that
decide them are kept in OUT/TASK/experiment.json, and another invocation with other settings is refused:
  0. the healed student, when --models has none (once)       heal.py
  1. teacher SFT with checkpoint dumps (once per task)        sft.py --role teacher
  2. student SFT, per seed (the frozen AW reference)          sft.py --role student
  3. per-sample losses and the SFS/TFS split, per seed        weights.py
  4. distillation, per variant and seed                       distill.py
       TD      the final teacher only, fixed alpha
       CD      checkpoints in training order, fixed alpha
       SCD     checkpoint chosen by Metric 1 + Metric 2, fixed alpha
       AW      the final teacher only, adaptive weights   (the paper never ran this one)
       SCD+AW  both
     each from the base student; `--variants scd_aw_from_sft,td_from_sft` starts from the seed's SFT student.
     Their learning rate is the paper's: grid-searched on TD (seed 0, validation score, --lr-grid) and shared by
     every method; the from-SFT variants get their own search (--sft-lr-grid). A grid of one rate is used as
     given, without a search (the rate an earlier run chose, say)
  5. test-split evaluation of the teacher, the base and SFT students and every variant (every test example)
Then OUT/TASK/results.md (+ results.json, schedule.png, predictions/<model>[_s<seed>].jsonl) with mean ± std over
seeds, a paired bootstrap of each variant against TD and against the SFT student (per seed and pooled, with a seed
interval when several seeds ran), wall time per stage, the SFS/TFS shares and how each variant moved the student's
loss on each side. Beyond the paper (issue #16): the scd_aw_* variants (SCD+AW with one choice changed) are also
compared with SCD+AW and their candidate count gives a granularity curve; --spacings trains the teacher again with
other checkpoint spacings and reports Metric 1 per checkpoint of each. A finished distillation keeps final/ and its
logs, not its resume state or (without --keep-stages) its stage exports.
"""

import argparse
import functools
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import torch

import data
import distill
import evaluate
import heal
import prepare
import runtime
import schedule
import sft
import teacher_cache
import weights
from model import checkpoint_files, load_model, model_fingerprint
from runtime import UserError, atomic_write_text, read_json, run_cli

VARIANTS = {  # name -> (label, distill.py flags)
    "td": ("TD", ["--schedule", "td", "--td-ckpt", "final", "--no-aw"]),
    "cd": ("CD", ["--schedule", "cd", "--no-aw"]),
    "scd": ("SCD", ["--schedule", "scd", "--no-aw"]),
    "aw_only": ("AW only", ["--schedule", "td", "--td-ckpt", "final", "--aw"]),
    "scd_aw": ("SCD+AW", ["--schedule", "scd", "--aw"]),
}
DEFAULT_VARIANTS = list(VARIANTS)  # each distils the base student; NAME_from_sft starts from the SFT student
BEYOND = {  # beyond the paper (issue #16): SCD+AW with one choice changed, run only when named in --variants
    "scd_aw_spread": ("SCD+AW, metrics / spread", ["--schedule", "scd", "--aw", "--metric-balance", "spread"]),
    "scd_aw_forward": ("SCD+AW, forward only", ["--schedule", "scd", "--aw", "--forward-only"]),
    "scd_aw_dynamic": ("SCD+AW, dynamic anchor", ["--schedule", "scd", "--aw", "--aw-anchor", "current"]),
    **{f"scd_aw_c{n}": (f"SCD+AW, {n} candidates", ["--schedule", "scd", "--aw", "--candidates", str(n)])
       for n in (3, 5, 10, 20)},
}
VARIANTS.update(BEYOND)
VARIANTS.update({f"{k}_from_sft": (f"{label} from SFT", flags) for k, (label, flags) in VARIANTS.items()})
# variants whose teacher changes by stage -> their line style in the schedule plot
SCHEDULED = {"scd": "o-", "cd": "s--", "scd_aw": "^:",
             "scd_from_sft": "o-.", "cd_from_sft": "s-.", "scd_aw_from_sft": "v-.",
             **{v: "x:" for v in VARIANTS if v.startswith("scd_aw_") and v != "scd_aw_from_sft"}}
PRESETS = {
    # flags for every training script, the test examples scored (0 = all), the distillation learning rates searched
    # on TD (from the base student) and on TD from the SFT student, and the validation examples that choose them
    "cpu": dict(train=["--preset", "cpu"], test_size=0, lr_grid="2e-4,5e-4,1e-3",
                sft_lr_grid="5e-5,1e-4,2e-4", grid_val=200),
    "gpu": dict(train=["--preset", "gpu"], test_size=0, lr_grid="1e-5,2e-5,5e-5",
                sft_lr_grid="5e-6,1e-5,2e-5", grid_val=0),
    "quick": dict(train=["--preset", "cpu", "--train-size", "16", "--val-size", "4", "--max-len", "128",
                         "--batch-size", "4", "--epochs", "2", "--dtype", "fp32"],
                  test_size=8, lr_grid="1e-3,3e-3", sft_lr_grid="1e-3", grid_val=4),
}
BOOTSTRAP = 2000  # paired resamples of the test examples
QUICK_SIZES = {"train_size": 16, "max_len": 128}  # as in the quick flags above
QUICK_MAX_NEW = 8  # the quick preset's generation cap, for tasks that generate their answers
QUICK_DISTILL = ["--stages", "2"]
QUICK_PROBE = ["--probe-size", "8"]  # SCD variants only
PROBE_SIZE = 32  # distill.py's default --probe-size
QUICK_TEACHER = ["--save-every", "2", "--lr", "3e-3"]
QUICK_STUDENT = ["--lr", "3e-3"]

# -----------------------------------------------------------------------------
# stage bookkeeping: skip what is complete, resume what was interrupted


def check_settings(root: Path, settings: dict):
    """Finished stages are reused by their outputs alone, so everything that changes them is recorded once in
    root/experiment.json, and a later invocation with other settings (another lr grid, a retrained student, other
    data) is refused by name instead of mixing runs."""
    path = root / "experiment.json"
    if path.exists():
        diff = sft.config_diff(read_json(path), json.loads(json.dumps(settings)))
        if diff:
            key, old, new = diff
            raise UserError(f"{path} has {key}={old!r} but this invocation has {key}={new!r}: its finished runs "
                            "would be reused as they are; use another --out (or delete that dir)")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def run_flags(out: Path, done: bool, resumable: bool) -> list[str] | None:
    """None if the stage is complete, else the flags that continue or (re)start it."""
    if done:
        return None
    if resumable:
        return ["--resume"]
    return ["--overwrite"] if out.exists() else []


def sft_done(out: Path) -> bool:
    index = out / sft.CHECKPOINT_INDEX
    return index.exists() and read_json(index).get("final") is not None


class Timer:
    """Wall time per stage, kept in OUT/TASK/timings.json across invocations (a reused stage keeps its time)."""

    def __init__(self, path: Path):
        self.path = path
        self.times = read_json(path) if path.exists() else {}

    def run(self, name: str, fn, *args, cached: Path | None = None):
        """fn(*args), timed; when `cached` exists the stage is already done: its JSON is returned, untimed."""
        if cached is not None and cached.exists():
            return read_json(cached)
        t0 = time.perf_counter()
        result = fn(*args)
        self.times[name] = round(time.perf_counter() - t0, 1)
        atomic_write_text(self.path, json.dumps(self.times, indent=2) + "\n")
        return result


def test_eval(model_dir: Path, out: Path, args, test_size: int, device) -> dict:
    """Test metrics of a model dir, written to `out` (JSON)."""
    max_new = QUICK_MAX_NEW if args.quick and args.kind != "choices" else None
    return evaluate.evaluate_dir(model_dir, args.task, "test", args.data_dir, args.test_file, test_size,
                                 args.eval_batch_size, max_new, device, args.dtype, out=out, progress=True,
                                 metric=args.metric)


def distill_flags(variant: str, args, root: Path, aw_dir: Path, student_run: Path) -> list[str]:
    """A variant's own flags: AW's reference only for AW variants, SCD's probe only for SCD (distill.py refuses
    flags its run would ignore)."""
    flags = VARIANTS[variant][1]
    out = list(flags)
    if "--aw" in flags and "current" not in flags:  # the dynamic anchor needs no frozen SFT student
        out += ["--student-sft", str(student_run), "--aw-table", str(aw_dir / "losses.safetensors")]
    if flags[flags.index("--schedule") + 1] == "scd":  # the probe's rows come from the teacher cache when there is one
        out += [*(["--probe-cache", str(root / "probe_cache")] if args.teacher_cache == "none" else []),
                *(QUICK_PROBE if args.quick else [])]
    if args.quick and args.kind != "choices":
        out += ["--max-new-tokens", str(QUICK_MAX_NEW)]
    return out


def prune_run(out: Path, keep_stages: bool):
    """A finished distillation needs its resume state no more, and the report reads only final/, schedule.jsonl and
    metrics.jsonl: drop resume/ and, unless asked to keep them, the stage_XX exports (one student copy each)."""
    stages = [] if keep_stages else [d for d in out.glob("stage_*") if re.fullmatch(r"stage_\d+", d.name)]
    for d in [out / "resume", *stages]:
        if d.is_dir():
            shutil.rmtree(d)

# -----------------------------------------------------------------------------
# the report


def prediction_rows(eval_json: Path, task: str, kind: str | None = None) -> list[dict]:
    """{"id", "gold", "pred"} per test example from evaluate.py's predictions file beside `eval_json`: the mentions
    (or the label, or the normalised text) exactly as the metric compares them."""
    rows = [json.loads(line) for line in eval_json.with_suffix(".predictions.jsonl").read_text().splitlines()]
    parse = lambda text: data.parse_answer(task, text, kind)  # noqa: E731
    return [{"id": r["id"], "gold": r["gold"] if isinstance(r["gold"], list) else parse(r["gold"]),
             "pred": parse(r["prediction"])} for r in rows]


def example_counts(rows: list[dict]) -> np.ndarray:
    """(n, 3) per test example: true positives, predicted and gold items. Entity F1 is prf of the column sums
    (mentions matched as (mention, type) multisets, as data.entity_scores does); for a label task each example is
    one item predicted and one gold, so F1 of the sums is the accuracy."""
    out = np.zeros((len(rows), 3), dtype=np.int64)
    for k, r in enumerate(rows):
        if isinstance(r["gold"], list):
            gold, pred = Counter(map(tuple, r["gold"])), Counter(map(tuple, r["pred"]))
            out[k] = (sum((gold & pred).values()), sum(pred.values()), sum(gold.values()))
        else:
            out[k] = (r["pred"] == r["gold"], 1, 1)
    return out


def answer_diagnostics(rows: list[dict]) -> dict | None:
    """Where an entity task's errors come from: precision, recall, the mentions predicted and gold, the predicted
    lines that repeat a mention the same answer already gave (greedy decoding looping until its token limit; each is
    a false positive unless the gold lists that mention as often), and the F1 with those repeats dropped, every
    answer read as a set. None for a label or exact-match task."""
    if not rows or not isinstance(rows[0]["gold"], list):
        return None
    tp, n_pred, n_gold = (int(v) for v in example_counts(rows).sum(0))
    precision, recall, _ = data.prf(tp, n_pred, n_gold)
    once = [{**r, "pred": list(dict.fromkeys(map(tuple, r["pred"])))} for r in rows]
    once_sums = example_counts(once).sum(0)
    return {"precision": precision, "recall": recall, "n_pred": n_pred, "n_gold": n_gold,
            "repeated": n_pred - int(once_sums[1]), "f1_without_repeats": float(f1_of_sums(once_sums))}


def f1_of_sums(sums: np.ndarray) -> np.ndarray:
    """data.prf's F1 over the last axis (tp, n_pred, n_gold), vectorised over resamples."""
    tp, n_pred, n_gold = (sums[..., i].astype(float) for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n_pred > 0, tp / n_pred, (n_gold == 0).astype(float))
        r = np.where(n_gold > 0, tp / n_gold, (n_pred == 0).astype(float))
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)


def paired_bootstrap(a: list[np.ndarray], b: list[np.ndarray], n_resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Difference in F1 (a − b) with a 95 % percentile interval, per seed and pooled over seeds.

    a[s], b[s] are example_counts of the two models of seed s over the same test examples (b[s] may be one model
    for every seed, the teacher say). Each resample draws n examples with replacement, the same draw for every seed
    and both sides, and recomputes micro F1 from the resampled counts on both sides; the pooled difference is the
    mean over seeds of the per-seed differences. The interval is the 2.5th and 97.5th percentile over resamples.
    """
    n = a[0].shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    per_seed, draws = [], []
    for ca, cb in zip(a, b):
        d = f1_of_sums(ca[idx].sum(1)) - f1_of_sums(cb[idx].sum(1))  # (n_resamples,)
        draws.append(d)
        per_seed.append({"diff": float(f1_of_sums(ca.sum(0)) - f1_of_sums(cb.sum(0))),
                         "lo": float(np.percentile(d, 2.5)), "hi": float(np.percentile(d, 97.5))})
    pooled = np.mean(draws, 0)
    out = {"per_seed": per_seed, "diff": float(np.mean([p["diff"] for p in per_seed])),
           "lo": float(np.percentile(pooled, 2.5)), "hi": float(np.percentile(pooled, 97.5))}
    if len(per_seed) > 1:  # training noise: how much the difference moves from one seed to the next
        diffs = [p["diff"] for p in per_seed]
        half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        out["seeds"] = {"lo": out["diff"] - half, "hi": out["diff"] + half, "df": len(diffs) - 1}
    return out


@functools.cache  # every comparison of a report asks for the same one
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: bisection on its CDF, integrated from its
    density by Simpson's rule (no scipy here)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:  # 0.5 + the integral of the density over [0, x]
        f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
        h = x / n
        return 0.5 + h / 3 * (f(0) + f(x) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, n)))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def verdict(b: dict) -> str:
    """Whether a difference holds: beyond its test-sentence interval and, when seeds were run, beyond the seed
    interval too (a gap that one seed shows and the next reverses is no finding)."""
    sides = [(b["lo"], b["hi"])] + ([(b["seeds"]["lo"], b["seeds"]["hi"])] if "seeds" in b else [])
    if all(lo > 0 for lo, _ in sides):
        return "yes, better"
    if all(hi < 0 for _, hi in sides):
        return "yes, worse"
    return "not over seeds" if b["lo"] > 0 or b["hi"] < 0 else "no"


def paper_variant(variant: str) -> str | None:
    """The paper's SCD+AW from the same start, for a beyond-the-paper variant (None for any other)."""
    if variant.removesuffix("_from_sft") not in BEYOND:
        return None
    return "scd_aw_from_sft" if variant.endswith("_from_sft") else "scd_aw"


def compare(root: Path, task: str, kind: str, seeds: list[int], eval_files: dict,
            variants: list[str]) -> tuple[dict, dict]:
    """Write root/predictions/<model>[_s<seed>].jsonl for every evaluated model, and bootstrap every distilled
    variant (and the SFT student) against TD and against the SFT student, and each variant started from the SFT
    student against TD from it, and each beyond-the-paper variant against the paper's SCD+AW from the same start,
    paired over the test examples. Returns the intervals, and answer_diagnostics per
    model and seed (empty for a label task)."""
    counts, diagnostics, ids = {}, {}, None
    for key, paths in eval_files.items():
        counts[key] = []
        for seed, path in zip(seeds, paths):
            rows = prediction_rows(path, task, kind)
            if ids is None:
                ids = [r["id"] for r in rows]
            elif [r["id"] for r in rows] != ids:
                raise UserError(f"{path}: scored other test examples than the other models; remove it to re-run")
            name = key if len(paths) == 1 and key != "student_sft" and key not in variants else f"{key}_s{seed}"
            atomic_write_text(root / "predictions" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            counts[key].append(example_counts(rows))
            if (d := answer_diagnostics(rows)) is not None:
                diagnostics.setdefault(key, []).append(d)
    out = {}
    for ref in ("td", "student_sft", "td_from_sft", "scd_aw", "scd_aw_from_sft"):
        for key in ["student_sft", *variants]:
            if ref == "td_from_sft" and not key.endswith("_from_sft"):  # a variant from the SFT student meets TD from it
                continue
            if ref.startswith("scd_aw") and paper_variant(key) != ref:  # one changed choice meets the paper's SCD+AW
                continue
            if key != ref and len(counts.get(key, [])) == len(counts.get(ref, [])) == len(seeds):
                out[f"{key} - {ref}"] = paired_bootstrap(counts[key], counts[ref])
    return out, diagnostics


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def side_losses(model_dir: Path, split: dict, items_by_id: dict, pad_id: int, device, dtype: str) -> dict:
    """Mean answer CE of a model on the SFS and on the TFS training examples."""
    model = load_model(model_dir, device=device)
    out = {}
    for side in ("sfs", "tfs"):
        items = [items_by_id[i] for i in split[f"{side}_ids"] if i in items_by_id]
        losses = weights.sample_losses(model, items, pad_id, 16, device, dtype) if items else torch.zeros(0)
        out[side] = float(losses.mean()) if len(losses) else None
    return out


def figure(png: Path, caption: str, draw) -> list[str]:
    """draw(plt) -> a matplotlib figure, saved to png; the report's line for it, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed, so there is no plot (pip install matplotlib)."]
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [f"![{caption}]({png.name})"]


def plot_schedule(root: Path, seed: int, variants: list[str], png: Path) -> str:
    """Chosen teacher checkpoint per stage for SCD and CD, with SCD's Metric 2 of its choice. Returns a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so there is no schedule plot (pip install matplotlib)."
    if not any(name in variants for name in SCHEDULED):
        png.unlink(missing_ok=True)  # a plot from an earlier invocation would describe runs this report omits
        return "No SCD or CD variant is in this report, so there is no schedule to plot."
    fig, ax = plt.subplots(figsize=(7, 4))
    ax2 = ax.twinx()
    for name, style in SCHEDULED.items():
        path = root / f"{name}_s{seed}" / "schedule.jsonl"
        if name not in variants or not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ax.plot([r["stage"] for r in rows], [r["chosen"] for r in rows], style, label=f"{VARIANTS[name][0]} choice")
        m2 = [next(c["metric2"] for c in r["candidates"] if c["ckpt"] == r["chosen"]) for r in rows]
        if all(m is not None for m in m2):
            ax2.plot([r["stage"] for r in rows], m2, style, alpha=0.4, color="gray")
    ax.set_xlabel("stage")
    ax.set_xticks(range(max((len(line.get_xdata()) for line in ax.lines), default=1)))
    ax.set_ylabel("teacher checkpoint (step)")
    ax2.set_ylabel("Metric 2 of the chosen checkpoint (grey)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    ax.set_title(f"{root.name}: teacher checkpoint per stage (seed {seed})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return ""


def stage_sides(root: Path, seed: int, variants: list[str], png: Path) -> list[str]:
    """Report lines for the SFS/TFS loss after every stage (distill.py --sides): one plot per variant, and a table.
    Nothing when no variant logged them."""
    curves = {}
    for v in variants:
        path = root / f"{v}_s{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        rows = [r for r in rows if r.get("eval") and "sfs_loss" in r]
        if rows:
            curves[v] = rows
    if not curves:
        return []
    lines = ["", f"## SFS / TFS loss after every stage (seed {seed})", "",
             "The student's mean answer CE on the SFS and on the TFS training examples at the end of each stage "
             "(distill.py --sides).", ""]

    def draw(plt):
        fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), sharey=True, squeeze=False)
        for ax, (v, rows) in zip(axes[0], curves.items()):
            for side, style in (("sfs", "o-"), ("tfs", "s--")):
                ax.plot([r["stage"] for r in rows], [r[f"{side}_loss"] for r in rows], style, label=side.upper())
            ax.set_title(VARIANTS[v][0], fontsize=9)
            ax.set_xlabel("stage")
        axes[0][0].set_ylabel("mean answer CE")
        axes[0][0].legend()
        return fig

    lines += [*figure(png, "SFS and TFS loss per stage", draw), ""]
    n = max(len(rows) for rows in curves.values())
    lines += ["| variant | " + " | ".join(f"stage {k} SFS / TFS" for k in range(n)) + " |",
              "|---|" + "---|" * n]
    for v, rows in curves.items():
        lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(f"{r['sfs_loss']:.4f} / {r['tfs_loss']:.4f}"
                                                           if r["sfs_loss"] is not None and r["tfs_loss"] is not None
                                                           else "-" for r in rows) + " |")
    return lines


def granularity(root: Path, variants: list[str], main: dict) -> list[dict]:
    """SCD+AW's test score against its number of candidate checkpoints (the scd_aw_cN variants, and scd_aw itself
    with every checkpoint of the teacher run), with the disk they take: the weights of the N candidates and of the
    best checkpoint (not the final one's optimiser state, which only resuming the teacher's SFT needs)."""
    index = sft.read_checkpoint_index(root / "teacher")

    def weight_bytes(step: int) -> int:
        return sum(f.stat().st_size for f in checkpoint_files(root / "teacher" / sft.checkpoint_name(step)))

    out = []
    for v in variants:
        flags = VARIANTS[v][1]
        if v.endswith("_from_sft") or not (v == "scd_aw" or "--candidates" in flags) or not main.get(v):
            continue
        n = int(flags[flags.index("--candidates") + 1]) if "--candidates" in flags else len(index["steps"])
        steps = sft.subset_steps(index["steps"], n, "even") if "--candidates" in flags else index["steps"]
        kept = {*steps, index["best"]}  # Metric 1 measures from the best checkpoint, a candidate or not
        out.append({"variant": v, "candidates": n, "checkpoints_kept": len(kept),
                    "storage_gib": sum(map(weight_bytes, kept)) / 2**30, "scores": main[v]})
    return sorted(out, key=lambda r: r["candidates"]) if len(out) > 1 else []


def footsteps(root: Path, args, runs: dict[str, Path], tok, sizes: dict, device) -> dict:
    """Metric 1 (KL from the run's best checkpoint) and val loss per checkpoint of each spacing's teacher run, on
    seed 0's probe set: how far apart the footsteps SCD can choose from are. Written to root/footsteps.json; the
    probe log-probs behind it are deleted once it is."""
    path = root / "footsteps.json"
    out = read_json(path) if path.exists() else {}
    if all(spacing in out for spacing in runs):
        return {spacing: out[spacing] for spacing in runs}
    sft_args = argparse.Namespace(task=args.task, data=args.data, data_dir=args.data_dir, metric=args.metric,
                                  max_len=sizes["max_len"], refuse_long=False)
    _, items = sft.load_split(tok, sft_args, "train", sizes["train_size"])
    probe = schedule.probe_items(items, int(QUICK_PROBE[1] if args.quick else PROBE_SIZE), 0)
    for spacing, run in runs.items():
        if spacing in out:
            continue
        index, checkpoints = sft.read_checkpoint_index(run), sft.list_checkpoints(run)
        cache = schedule.ProbeCache(root / "footsteps_probe", probe, checkpoints, args.dtype, device, tok.files)
        best = cache.build(tok.pad_id, args.eval_batch_size).load(index["best"])
        out[spacing] = {"run": str(run), "best": index["best"], "final": index["final"], "checkpoints": [
            {"step": step, "metric1": schedule.metric1(best, cache.load(step)),
             "val_loss": read_json(ckpt / "meta.json").get("val_loss")} for step, ckpt in checkpoints]}
        atomic_write_text(path, json.dumps(out, indent=2) + "\n")
        shutil.rmtree(cache.dir)
    return {spacing: out[spacing] for spacing in runs}


def footsteps_section(root: Path, steps: dict) -> list[str]:
    """Report lines for footsteps(): Metric 1 per checkpoint, one line per spacing, and one plot of them."""
    if not steps:
        return []
    lines = ["", "## Where the footsteps are: Metric 1 per teacher checkpoint, by spacing", "",
             "Metric 1 = KL(p_best ‖ p_c) on seed 0's probe set, each run against its own best (lowest val loss) "
             "checkpoint, as SCD computes it. Each spacing is the same teacher recipe (seed, data order, lr) trained "
             "again; floating-point drift between runs makes them differ a little, so each best's val loss is "
             "given.", ""]
    for spacing, r in steps.items():
        best = next(c for c in r["checkpoints"] if c["step"] == r["best"])
        val = "" if best["val_loss"] is None else f", val loss {best['val_loss']:.4f}"
        lines += [f"- {spacing} ({len(r['checkpoints'])} checkpoints, best {r['best']}{val}): " + ", ".join(
            f"{c['step']}: {c['metric1']:.3f}" for c in r["checkpoints"])]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for spacing, r in steps.items():
            ax.plot([c["step"] for c in r["checkpoints"]], [c["metric1"] for c in r["checkpoints"]], "o-",
                    label=spacing)
        ax.set_xlabel("teacher step")
        ax.set_ylabel("Metric 1 (nats)")
        ax.legend()
        return fig

    return [*lines, "", *figure(root / "footsteps.png", "Metric 1 per checkpoint, by spacing", draw)]


def beyond_section(root: Path, seed: int, variants: list[str], results: dict, metric: str) -> list[str]:
    """Report lines for the beyond-the-paper variants: each against the paper's SCD+AW from the same start, the
    schedule it walked, and the granularity curve. Nothing when none ran."""
    beyond = [v for v in variants if paper_variant(v)]
    if not beyond:
        return []
    lines = ["", "## Beyond the paper: one choice of SCD+AW changed at a time", "",
             f"Each row is the paper's SCD+AW with one flag changed; the difference is to SCD+AW from the same start "
             f"(paired bootstrap as above; pooled over the seeds run). Schedule: seed {seed}.", "",
             f"| variant | flag | {metric} | − SCD+AW [95 % intervals] | beyond them? | checkpoints chosen |",
             "|---|---|---|---|---|---|"]
    paper_flags = VARIANTS["scd_aw"][1]
    for v in beyond:
        flags = VARIANTS[v][1]
        changed = " ".join(f for k, f in enumerate(flags) if k >= len(paper_flags) or f != paper_flags[k])
        b = results.get("intervals", {}).get(f"{v} - {paper_variant(v)}")
        diff = "-" if b is None else f"{b['diff']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}]" + (
            f", seeds [{b['seeds']['lo']:+.4f}, {b['seeds']['hi']:+.4f}]" if "seeds" in b else "")
        path = root / f"{v}_s{seed}" / "schedule.jsonl"
        chosen = [json.loads(line)["chosen"] for line in path.read_text().splitlines()] if path.exists() else []
        lines.append(f"| {VARIANTS[v][0]} | `{changed}` | {mean_std(results['main'].get(v, []))} | {diff} | "
                     f"{'-' if b is None else verdict(b)} | {chosen or '-'} |")
    curve = results.get("granularity", [])
    if len(curve) > 1:
        lines += ["", "### Granularity: candidate checkpoints against score and storage", "",
                  "| candidates | variant | " + metric + " | checkpoints kept (the candidates and the best) | "
                  "weights stored (GiB) |", "|---|---|---|---|---|"]
        lines += [f"| {r['candidates']} | {VARIANTS[r['variant']][0]} | {mean_std(r['scores'])} | "
                  f"{r['checkpoints_kept']} | {r['storage_gib']:.2f} |" for r in curve]

        def draw(plt):
            fig, ax = plt.subplots(figsize=(5, 3.2))
            xs = [r["candidates"] for r in curve]
            ax.errorbar(xs, [statistics.mean(r["scores"]) for r in curve],
                        yerr=[statistics.stdev(r["scores"]) if len(r["scores"]) > 1 else 0 for r in curve], fmt="o-")
            ax.set_xlabel("candidate teacher checkpoints")
            ax.set_ylabel(f"test {metric}")
            ax2 = ax.twinx()
            ax2.plot(xs, [r["storage_gib"] for r in curve], "s--", color="gray")
            ax2.set_ylabel("checkpoint weights kept, GiB (grey)")
            return fig

        lines += ["", *figure(root / "granularity.png", "score and storage against candidate checkpoints", draw)]
    return lines


def write_report(root: Path, args, seeds: list[int], results: dict, timings: dict, sides: dict, split: dict | None,
                 note: str, command: str):
    metric = {"choices": "accuracy", "entities": "entity F1", "exact": "exact match"}[args.kind]
    rows = [("teacher base", "teacher_base"), ("teacher SFT (final)", "teacher"), ("student base", "student_base"),
            ("student SFT", "student_sft")]
    rows += [(label, v) for v, (label, _) in VARIANTS.items() if v in args.variants]  # paper order, any run order
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    machine = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{os.cpu_count()} cores)"
    lines = [f"# SCD experiment: {args.task}" + (f" ({args.data}, metric {args.kind})" if args.data else ""), "",
             f"Run {date.today().isoformat()} with the `{args.preset}` preset, seeds {seeds}, on {machine}, "
             f"torch {torch.__version__}.", "", "```", command, "```", "",
             f"## Test {metric} (mean ± std over {len(seeds)} seed{'s' * (len(seeds) > 1)})", "",
             f"Test examples scored: {results.get('n_test', '?')}.", "",
             "| model | " + metric + " | per seed |", "|---|---|---|"]
    for label, key in rows:
        vals = results["main"].get(key, [])
        lines.append(f"| {label} | {mean_std(vals)} | {', '.join(f'{v:.4f}' for v in vals)} |")
    intervals = results.get("intervals", {})
    if intervals:
        lines += ["", f"## Paired bootstrap ({BOOTSTRAP} resamples of the {results.get('n_test', '?')} test examples)",
                  "", "Each resample draws the test examples with replacement (the same draw for both models and "
                  f"every seed) and recomputes the {metric} of both sides from the resampled counts; the interval is "
                  "the 2.5th-97.5th percentile of the difference. Pooled = the mean over seeds of the per-seed "
                  "difference. That interval holds the test examples' noise, not the training seed's: with several "
                  "seeds, the seed interval is the pooled difference ± t(0.975, seeds − 1) × the per-seed "
                  "differences' standard deviation / √seeds. A difference holds when it is beyond both."
                  + ("" if len(seeds) > 1 else " With one seed the training noise is not measured."), "",
                  "| comparison | pooled difference [95 % interval] | seed interval | per seed | beyond them? |",
                  "|---|---|---|---|---|"]
        names = {k: label for label, k in rows}
        for pair, b in intervals.items():
            a, ref = pair.split(" - ")
            per = ", ".join(f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" for p in b["per_seed"])
            over_seeds = f"[{b['seeds']['lo']:+.4f}, {b['seeds']['hi']:+.4f}]" if "seeds" in b else "-"
            lines.append(f"| {names.get(a, a)} − {names.get(ref, ref)} | {b['diff']:+.4f} [{b['lo']:+.4f}, "
                         f"{b['hi']:+.4f}] | {over_seeds} | {per} | {verdict(b)} |")
    if results.get("diagnostics"):
        n_gold = next(iter(results["diagnostics"].values()))[0]["n_gold"]
        lines += ["", f"## Where the errors come from (mean over seeds; {n_gold} gold mentions)", "",
                  "Precision and recall of the mentions; the mentions predicted; the predicted lines that repeat a "
                  "mention the same answer already gave (greedy decoding looping until its token limit: each is a "
                  "false positive unless the gold lists that mention as often); and the F1 with those repeats "
                  f"dropped, every answer read as a set. The {metric} above counts every repeat, as the paper's "
                  "metric does.", "",
                  "| model | precision | recall | predicted | repeated | F1 without repeats |",
                  "|---|---|---|---|---|---|"]
        for label, key in rows:
            ds = results["diagnostics"].get(key)
            if ds:
                avg = {k: statistics.mean(d[k] for d in ds) for k in ds[0]}
                lines.append(f"| {label} | {avg['precision']:.4f} | {avg['recall']:.4f} | {avg['n_pred']:.0f} | "
                             f"{avg['repeated']:.0f} | {avg['f1_without_repeats']:.4f} |")
    if results.get("lr_search"):
        searched = any(not r.get("given") for r in results["lr_search"].values())
        lines += ["", "## Learning-rate search (seed %d, validation %s)" % (seeds[0], metric) if searched
                  else "## Learning rate", ""]
        for start, r in results["lr_search"].items():
            if r.get("given"):
                lines.append(f"- {VARIANTS[r['variant']][0]}: {r['chosen']}, given (a grid of one rate: not searched)")
                continue
            lines.append(f"- {VARIANTS[r['variant']][0]} ({r['n'] or 'all'} val examples): "
                         + ", ".join(f"{lr}: {v:.4f}" for lr, v in r["scores"].items()) + f"; chosen {r['chosen']}")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "## SFS / TFS (seed %d, teacher = final checkpoint)" % seeds[0], ""]
    if split:
        lines += [f"SFS (student-SFT better than the teacher): {split['sfs_share']:.1%} of {split['n']} training "
                  f"examples, mean advantage {split['sfs_gap']:.4f} nats; TFS: {split['tfs_share']:.1%}, mean deficit "
                  f"{split['tfs_gap']:.4f} nats.", "",
                  "Mean answer CE on each side, and the change from the SFT student (negative = better):", "",
                  "| model | SFS loss | Δ SFS | TFS loss | Δ TFS |", "|---|---|---|---|---|"]
        ref = sides.get("student_sft", {})
        for label, key in rows:
            s = sides.get(key)
            if not s:
                continue
            d = {k: (s[k] - ref[k]) if s.get(k) is not None and ref.get(k) is not None else None for k in s}
            fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
            lines.append(f"| {label} | {fmt(s['sfs'])} | {fmt(d['sfs'])} | {fmt(s['tfs'])} | {fmt(d['tfs'])} |")
    lines += stage_sides(root, seeds[0], args.variants, root / "stage_sides.png")
    lines += beyond_section(root, seeds[0], args.variants, results, metric)
    lines += footsteps_section(root, results.get("footsteps", {}))
    lines += ["", "## Schedule", ""]
    lines += [note] if note else ["![teacher checkpoint per stage](schedule.png)"]
    for name in SCHEDULED:
        path = root / f"{name}_s{seeds[0]}" / "schedule.jsonl"
        if name in args.variants and path.exists():
            chosen = [json.loads(line)["chosen"] for line in path.read_text().splitlines() if line.strip()]
            lines.append(f"- {VARIANTS[name][0]}: checkpoints {chosen}")
    atomic_write_text(root / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(root / "results.json", json.dumps({"task": args.task, "preset": args.preset, "seeds": seeds,
                                                         "metric": metric, **results, "timings": timings,
                                                         "sides": sides}, indent=2) + "\n")

# -----------------------------------------------------------------------------


def main(argv=None):
    runtime.single_process("experiment.py")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="ncbi_disease", help="ncbi_disease, bc5cdr, pubmedqa or jsonl (with --data)")
    p.add_argument("--data", default=None, help="--task jsonl: train,val,test JSONL files, comma-separated")
    p.add_argument("--metric", choices=data.METRICS, default=None,
                   help="how --task jsonl is scored when its files do not say (see data.py)")
    p.add_argument("--seeds", type=int, default=1, help="students per variant (seeds 0..N-1); one teacher")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="sizes of every stage")
    p.add_argument("--quick", action="store_true", help="tiny random models with the real tokenizer and data: "
                                                        "the whole pipeline in about a minute (smoke test)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from " + ",".join(DEFAULT_VARIANTS) + "; add _from_sft to a name to "
                        "start that distillation from the seed's SFT student instead of the base student")
    p.add_argument("--out", default="runs/experiment", help="root dir; everything goes to OUT/TASK/")
    p.add_argument("--models", default="models", help="dir with teacher/ and student/ (made by prepare.py)")
    p.add_argument("--data-dir", default=None, help="directory with the built-in tasks' files (default "
                                                    "../shared/data)")
    p.add_argument("--test-size", type=int, default=None, help="test examples to score (0 = all, the presets' default)")
    p.add_argument("--heal", action=argparse.BooleanOptionalAction, default=True,
                   help="require the student to be heal.py's (it is made when missing); --no-heal uses --models' "
                        "student/ as it is, e.g. an intact pretrained model of your own")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--eval-batch-size", type=int, default=16, help="batch size of evaluation")
    p.add_argument("--lr-grid", default=None, help="distillation learning rates tried on TD from the base student "
                                                   "(seed 0, validation score); the best is used by every variant "
                                                   "(one rate: used as given, no search, e.g. an earlier run's "
                                                   "choice; '' = distill.py's default; default: the preset's)")
    p.add_argument("--sft-lr-grid", default=None, help="the same for the variants started from the SFT student")
    p.add_argument("--stage-sides", action="store_true",
                   help="log every variant's SFS/TFS loss after each stage on the first seed, the one analysed "
                        "(distill.py --sides; one forward over the training examples per stage) and plot it")
    p.add_argument("--teacher-checkpoints", type=int, default=None,
                   help="checkpoints the teacher SFT saves (sft.py --checkpoints; default its 10); 20 lets the "
                        "scd_aw_c3..c20 variants all be subsets of one teacher run")
    p.add_argument("--keep-stages", action="store_true",
                   help="keep every distillation's stage_XX exports (the student after each stage); by default a "
                        "finished run keeps final/ only (its resume/ state always goes)")
    p.add_argument("--spacings", default="",
                   help="also train the teacher with these checkpoint spacings (sft.py --spacing; comma-separated "
                        "from geometric,val_loss) into OUT/TASK/teacher_<spacing>, and report Metric 1 per checkpoint "
                        "of each beside the main, evenly spaced teacher's")
    p.add_argument("--teacher-cache", choices=["exact", "topk", "none"], default="exact",
                   help="distil from the teacher checkpoints' log-probs, computed once per teacher into "
                        "OUT/TASK/teacher_cache (teacher_cache.py), or 'none': every run forwards its teacher")
    p.add_argument("--top-k", type=int, default=teacher_cache.DEFAULT_K, help="k of --teacher-cache topk")
    p.add_argument("--cache-precision", choices=sorted(teacher_cache.PRECISIONS), default="fp32",
                   help="on-disk dtype of the cached log-probs; fp32 distils as the teacher model would, to fp "
                        "rounding (cpu preset on NCBI: 553 MiB per checkpoint; fp16 halves it)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or args.seeds < 1:
        raise UserError(f"--variants {unknown[0]!r}: unknown" if unknown else "--seeds must be at least 1")
    for v in list(args.variants):  # a changed choice is measured against the paper's SCD+AW from the same start
        if paper_variant(v) and paper_variant(v) not in args.variants:
            args.variants.insert(args.variants.index(v), paper_variant(v))
    args.spacings = [x for x in args.spacings.split(",") if x]
    bad = [x for x in args.spacings if x not in sft.SPACINGS or x == "even"]
    if bad:
        raise UserError(f"--spacings {bad[0]!r}: expected geometric or val_loss (the main teacher is the even one)")
    if args.quick and args.teacher_checkpoints:
        raise UserError("--teacher-checkpoints: --quick's teacher saves every 2 steps; drop one of them")
    if args.teacher_checkpoints is not None and args.teacher_checkpoints < 1:
        raise UserError(f"--teacher-checkpoints {args.teacher_checkpoints}: must be at least 1")
    if args.quick and "preset" in runtime.given_flags(p, argv):
        raise UserError(f"--preset {args.preset}: --quick sets every size itself; drop one of them")
    data.check_task_flags(args.task, args.data, args.data_dir, args.metric)  # now, not an hour in
    args.test_file, examples = None, []
    if args.task == "jsonl":
        files = args.data.split(",")
        if len(files) != 3 or not all(files):
            raise UserError(f"--data {args.data}: the experiment needs three files, train,val,test")
        args.test_file = files[2]
        examples = data.load_examples("jsonl", "test", data_file=args.test_file, metric=args.metric)
    args.kind = data.answer_kind(args.task, examples)
    preset = PRESETS["quick" if args.quick else args.preset]
    if args.quick:
        args.preset = "quick"
    test_size = preset["test_size"] if args.test_size is None else args.test_size
    for key in ("lr_grid", "sft_lr_grid"):
        grid = preset[key] if getattr(args, key) is None else getattr(args, key)
        try:
            setattr(args, key, [f"{float(x):g}" for x in grid.split(",") if x.strip()])
        except ValueError:
            raise UserError(f"--{key.replace('_', '-')} {grid!r}: expected comma-separated learning rates") from None
    sizes = QUICK_SIZES if args.quick else {k: sft.PRESETS[args.preset][k] for k in QUICK_SIZES}
    device = runtime.resolve_device(args.device)
    args.dtype = "fp32" if args.quick else runtime.resolve_dtype("auto", device)  # as sft.py's presets
    seeds = list(range(args.seeds))
    command = shlex.join(["python", "experiment.py", *(sys.argv[1:] if argv is None else argv)])

    name = f"jsonl_{Path(args.test_file).stem.removesuffix('.test').removesuffix('_test')}" if args.test_file \
        else args.task
    root = Path(args.out) / (f"{name}_quick" if args.quick else name)
    root.mkdir(parents=True, exist_ok=True)
    models = Path(args.models)
    if args.quick:  # tiny random teacher and student that carry the real tokenizer
        prepare.main(["--out-dir", str(models)])
        for name, layers in (("teacher", 2), ("student", 1)):
            if not (root / "models" / name / "model.safetensors").exists():
                prepare.build_tiny(root / "models" / name, models / "teacher", n_layers=layers, seed=layers)
        models = root / "models"
    elif not (models / "teacher" / "config.json").exists():
        raise UserError(f"--models {models}: no teacher/ there; run python prepare.py first")
    searched = [g for g in (args.lr_grid, args.sft_lr_grid if any(v.endswith("_from_sft") for v in args.variants)
                            else []) if len(g) > 1]  # a grid of one rate is used as given
    grid_runs = sum(len(g) for g in searched)
    n_runs = 2 + len(args.spacings) + grid_runs + len(seeds) * (2 + len(args.variants))
    print(f"experiment {args.task}: preset {args.preset}, seeds {seeds}, variants {args.variants}: {n_runs} training "
          f"runs ({grid_runs} of them the learning-rate search); the README lists what each took -> {root}")

    timer = Timer(root / "timings.json")
    student_dir = models / "student"
    if not args.quick and not (student_dir / "config.json").exists():  # the healed student, made once for all tasks
        heal_run = Path(args.out) / "heal"
        flags = ["--resume"] if sft.latest_resumable(heal_run) else (["--overwrite"] if heal_run.exists() else [])
        timer.run("heal student", heal.main, [
            "--teacher", str(models / "teacher"), "--export", str(student_dir), "--out", str(heal_run),
            "--device", str(device), *(["--data-dir", args.data_dir] if args.data_dir and not args.data else []),
            *flags])
    elif not args.quick and not (student_dir / "heal.json").exists() and args.heal:
        raise UserError(f"--models {models}: student/ was not made by heal.py (no heal.json); run python heal.py "
                        "--overwrite to heal the default student, or pass --no-heal to use this one as it is")
    check_settings(root, {"task": args.task, "data": args.data, "metric": args.metric, "preset": args.preset,
                          "test_size": test_size, "lr_grid": args.lr_grid, "sft_lr_grid": args.sft_lr_grid,
                          "teacher_checkpoints": args.teacher_checkpoints, "teacher_cache": args.teacher_cache,
                          "top_k": args.top_k if args.teacher_cache == "topk" else None,
                          "cache_precision": args.cache_precision,
                          "models": {"teacher": model_fingerprint(models / "teacher"),
                                     "student": model_fingerprint(student_dir)}})
    task_flags = ["--task", args.task, *(["--data", args.data] if args.data else []),
                  *(["--metric", args.metric] if args.metric else []),
                  *(["--data-dir", args.data_dir] if args.data_dir else [])]
    common = [*preset["train"], *task_flags, "--device", str(device)]
    quick_eval = ["--eval-max-new-tokens", str(QUICK_MAX_NEW)] if args.quick and args.kind != "choices" else []
    teacher_run = root / "teacher"
    flags = run_flags(teacher_run, sft_done(teacher_run), sft.latest_resumable(teacher_run) is not None
                      if teacher_run.exists() else False)
    if flags is not None:
        timer.run("teacher SFT", sft.main, ["--role", "teacher", "--model", str(models / "teacher"), "--out",
                                            str(teacher_run), *common, *quick_eval,
                                            *(["--checkpoints", str(args.teacher_checkpoints)]
                                              if args.teacher_checkpoints else []),
                                            *(QUICK_TEACHER if args.quick else []), *flags])
    index = sft.read_checkpoint_index(teacher_run)
    results = {"main": {k: [] for k in ["teacher_base", "teacher", "student_base", "student_sft", *args.variants]}}
    evals = root / "evals"
    eval_files = {k: [] for k in results["main"]}  # model -> its test eval JSON per seed
    teacher_final = teacher_run / sft.checkpoint_name(index["final"])
    for key, model_dir in (("teacher_base", models / "teacher"), ("teacher", teacher_final),
                           ("student_base", models / "student")):
        m = timer.run(f"eval {key}", test_eval, model_dir, evals / f"{key}.json", args, test_size, device,
                      cached=evals / f"{key}.json")
        results["main"][key] = [m["main"]]
        results["n_test"] = m["n"]
        eval_files[key] = [evals / f"{key}.json"]

    @functools.cache
    def cache_flags() -> tuple[str, ...]:
        """The teacher cache, once per teacher, every variant and seed reads it: built (or checked) when the first
        distillation with work left asks for it, so a run that only writes the report again needs no cache."""
        if args.teacher_cache == "none":
            return ()
        cache_dir = root / "teacher_cache"
        probe_size = QUICK_PROBE[1] if args.quick else str(PROBE_SIZE)
        build = [teacher_cache.main, ["--teacher", str(teacher_run), "--out", str(cache_dir), "--tokenizer",
                                      str(models / "student"), "--form", args.teacher_cache, "--top-k",
                                      str(args.top_k), "--precision", args.cache_precision, "--seeds",
                                      ",".join(map(str, seeds)), "--probe-size", probe_size, *task_flags,
                                      "--train-size", str(sizes["train_size"]), "--max-len", str(sizes["max_len"]),
                                      "--dtype", args.dtype, "--device", str(device)]]
        if "teacher cache" in timer.times and (cache_dir / teacher_cache.MANIFEST).exists():
            build[0](build[1])  # checks the cache; writes only what a changed teacher needs, so it keeps its time
        else:
            timer.run("teacher cache", *build)
        return "--teacher-cache", str(cache_dir)

    if args.spacings:  # the same teacher recipe, saved at other steps: how far apart are its footsteps?
        runs = {"even": teacher_run}
        measured = read_json(root / "footsteps.json") if (root / "footsteps.json").exists() else {}
        for spacing in args.spacings:
            runs[spacing] = root / f"teacher_{spacing}"
            flags = run_flags(runs[spacing], sft_done(runs[spacing]), runs[spacing].exists()
                              and sft.latest_resumable(runs[spacing]) is not None)
            if flags is not None and spacing not in measured:  # once measured, its checkpoints may be deleted
                count = ["--checkpoints", str(args.teacher_checkpoints or len(index["steps"]))]
                timer.run(f"teacher SFT {spacing}", sft.main, [
                    "--role", "teacher", "--model", str(models / "teacher"), "--out", str(runs[spacing]), *common,
                    *quick_eval, "--spacing", spacing, *count, *(QUICK_STUDENT if args.quick else []), *flags])
        results["footsteps"] = footsteps(root, args, runs, data.load_tokenizer(models / "teacher"), sizes, device)

    sides, split, lr_search = {}, None, {}
    for seed in seeds:
        s_common = [*common, "--seed", str(seed)]
        student_run = root / f"student_s{seed}"
        flags = run_flags(student_run, sft_done(student_run), student_run.exists()
                          and sft.latest_resumable(student_run) is not None)
        if flags is not None:
            timer.run(f"student SFT s{seed}", sft.main, ["--role", "student", "--model", str(models / "student"),
                                                         "--out", str(student_run), *s_common, *quick_eval,
                                                         *(QUICK_STUDENT if args.quick else []), *flags])
        student_final = weights.student_sft_checkpoint(student_run)
        path = evals / f"student_sft_s{seed}.json"
        m = timer.run(f"eval student SFT s{seed}", test_eval, student_final, path, args, test_size, device,
                      cached=path)
        results["main"]["student_sft"].append(m["main"])
        eval_files["student_sft"].append(path)

        aw_dir = root / f"weights_s{seed}"
        if not (aw_dir / "sfs_tfs.json").exists():
            timer.run(f"weights s{seed}", weights.main, ["--teacher", str(teacher_run), "--student-sft",
                                                         str(student_run), "--out", str(aw_dir), *task_flags,
                                                         "--preset", "cpu" if args.quick else args.preset,
                                                         "--train-size", str(sizes["train_size"]),
                                                         "--max-len", str(sizes["max_len"]),
                                                         "--dtype", args.dtype, "--device", str(device)])

        def run_distill(variant: str, out: Path, name: str, *extra: str, split: str = "test",
                        size: int = test_size) -> dict:
            """One distill.py run (skipped when complete, resumed when interrupted); its final eval metrics."""
            done = (out / "final" / f"eval_{args.task}_{split}.json").exists()
            flags = run_flags(out, done, (out / "resume").exists())
            if flags is not None:
                timer.run(name, distill.main, [
                    *distill_flags(variant, args, root, aw_dir, student_run), "--teacher", str(teacher_run),
                    "--init", str(student_final if variant.endswith("_from_sft") else models / "student"),
                    "--variant", variant, "--out", str(out), "--eval-split", split, "--eval-size", str(size),
                    *cache_flags(), *s_common, *(QUICK_DISTILL if args.quick else []), *extra, *flags])
            prune_run(out, args.keep_stages)
            return read_json(out / "final" / f"eval_{args.task}_{split}.json")

        if seed == seeds[0]:  # the paper's learning-rate search: on TD, by validation score, shared by all methods
            for start, grid in (("base", args.lr_grid), ("sft", args.sft_lr_grid)):
                if grid and (start == "base" or any(v.endswith("_from_sft") for v in args.variants)):
                    td = "td" if start == "base" else "td_from_sft"
                    if len(grid) == 1:  # nothing to choose between: the rate as given, no validation run
                        lr_search[start] = {"variant": td, "chosen": grid[0], "given": True}
                        continue
                    scores = {lr: run_distill(td, root / f"lr_{td}_{lr}", f"lr search {td} {lr}", "--lr", lr,
                                              split="val", size=preset["grid_val"])["main"] for lr in grid}
                    lr_search[start] = {"variant": td, "split": "val", "n": preset["grid_val"], "scores": scores,
                                        "chosen": max(grid, key=lambda lr: (scores[lr], -grid.index(lr)))}
            atomic_write_text(root / "lr_search.json", json.dumps(lr_search, indent=2) + "\n")
        for variant in args.variants:
            start = "sft" if variant.endswith("_from_sft") else "base"
            lr = ["--lr", lr_search[start]["chosen"]] if start in lr_search else []
            sides_flag = ["--sides", str(aw_dir / "sfs_tfs.json")] if args.stage_sides and seed == seeds[0] else []
            m = run_distill(variant, root / f"{variant}_s{seed}", f"distill {variant} s{seed}", *lr, *sides_flag)
            results["main"][variant].append(m["main"])
            eval_files[variant].append(root / f"{variant}_s{seed}" / "final" / f"eval_{args.task}_test.json")

        if seed == seeds[0]:  # the paper's theory, measured on the first seed: loss on SFS and TFS examples
            analysis = read_json(aw_dir / "sfs_tfs.json")
            split = weights.final_split(analysis)
            sides_path = root / "sides.json"
            sides = read_json(sides_path) if sides_path.exists() else {}
            tok = data.load_tokenizer(models / "student")
            items = None
            dirs = {"teacher": teacher_final, "student_base": models / "student", "student_sft": student_final,
                    **{v: root / f"{v}_s{seed}" / "final" for v in args.variants}}
            for key, model_dir in dirs.items():
                if key in sides:
                    continue
                if items is None:
                    sft_args = argparse.Namespace(task=args.task, data=args.data, data_dir=args.data_dir,
                                                  metric=args.metric, max_len=sizes["max_len"], refuse_long=False)
                    _, train_items = sft.load_split(tok, sft_args, "train", sizes["train_size"])
                    items = {it["id"]: it for it in train_items}
                sides[key] = side_losses(model_dir, split, items, tok.pad_id, device, args.dtype)
                atomic_write_text(sides_path, json.dumps(sides, indent=2) + "\n")

    results["intervals"], results["diagnostics"] = compare(root, args.task, args.kind, seeds, eval_files,
                                                           args.variants)
    results["lr_search"] = lr_search
    results["granularity"] = granularity(root, args.variants, results["main"])
    note = plot_schedule(root, seeds[0], args.variants, root / "schedule.png")
    write_report(root, args, seeds, results, timer.times, sides, split, note, command)
    print((root / "results.md").read_text())


if __name__ == "__main__":
    run_cli(main)
