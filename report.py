"""The experiment's report: results.md and results.json in OUT/TASK, with predictions/<model>[_s<seed>].jsonl and the
plots (arXiv 2601.10114, Sec. 4).

Test scores as mean ± std over seeds; a paired bootstrap of each variant against TD and against the SFT student (per
seed and pooled, with a seed interval when several seeds ran); both for each score an entity task has: strict (the
answers as decoded, to the token cap) and stopped (cut before their first repeated line, cut_rows), or the stopped one
alone when the answers were decoded with stopping; where an entity task's errors come from; wall time per
stage; the SFS/TFS shares and how each variant moved the student's loss on each side; the schedule each variant
walked. Beyond the paper: each scd_aw_* variant (SCD+AW with one choice changed) against SCD+AW, their candidate
counts as a granularity curve, and Metric 1 per checkpoint of each teacher spacing.

The variants compared live here too (labels and distill.py flags), since the report describes them; experiment.py
runs them. Nothing here runs a model.
"""

import functools
import json
import math
import os
import platform
import statistics
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import torch

import checkpoints
import data
from footsteps import subset_steps
from model import checkpoint_files
from runtime import UserError, atomic_write_text, read_json

# the variants compared (Sec. 4), in the report's order: name -> (label, distill.py flags)
VARIANTS = {
    "td": ("TD", ["--schedule", "td", "--td-ckpt", "final", "--no-aw"]),
    "cd": ("CD", ["--schedule", "cd", "--no-aw"]),
    "scd": ("SCD", ["--schedule", "scd", "--no-aw"]),
    "aw_only": ("AW only", ["--schedule", "td", "--td-ckpt", "final", "--aw"]),
    "scd_aw": ("SCD+AW", ["--schedule", "scd", "--aw"]),
}
DEFAULT_VARIANTS = list(VARIANTS)  # each distils the base student; NAME_from_sft starts from the SFT student
BEYOND = {  # beyond the paper: SCD+AW with one choice changed, run only when named in --variants
    "scd_aw_spread": ("SCD+AW, metrics / spread", ["--schedule", "scd", "--aw", "--metric-balance", "spread"]),
    "scd_aw_forward": ("SCD+AW, forward only", ["--schedule", "scd", "--aw", "--forward-only"]),
    "scd_aw_dynamic": ("SCD+AW, dynamic anchor", ["--schedule", "scd", "--aw", "--aw-anchor", "current"]),
    **{f"scd_aw_c{n}": (f"SCD+AW, {n} candidates", ["--schedule", "scd", "--aw", "--candidates", str(n)])
       for n in (3, 5, 10, 20)},
}
RIVALS = {  # the nearest rivals, on TD's teacher (the final checkpoint), each with its own paper's objective
    "taid": ("TAID", ["--schedule", "td", "--td-ckpt", "final", "--no-aw", "--alpha", "1", "--loss", "taid"]),
    "gkd": ("GKD (on-policy)", ["--schedule", "td", "--td-ckpt", "final", "--no-aw", "--alpha", "1", "--loss", "jsd",
                                "--beta", "0.5", "--on-policy", "0.5"]),
}
VARIANTS.update(BEYOND)
VARIANTS.update(RIVALS)
VARIANTS.update({f"{k}_from_sft": (f"{label} from SFT", flags) for k, (label, flags) in VARIANTS.items()})
# variants whose teacher changes by stage -> their line style in the schedule plot
SCHEDULED = {"scd": "o-", "cd": "s--", "scd_aw": "^:",
             "scd_from_sft": "o-.", "cd_from_sft": "s-.", "scd_aw_from_sft": "v-.",
             **{v: "x:" for v in VARIANTS if v.startswith("scd_aw_") and v != "scd_aw_from_sft"}}
BOOTSTRAP = 2000  # paired resamples of the test examples
# experiment.json settings a root from before their flag existed lacks: the value every run had then
SETTINGS_BEFORE = {"decode": "strict", "protocol": "short"}
METRICS = {"choices": "accuracy", "entities": "entity F1", "exact": "exact match"}  # answer kind -> its score's name


def paper_variant(variant: str) -> str | None:
    """The paper's SCD+AW from the same start, for a beyond-the-paper variant (None for any other)."""
    if variant.removesuffix("_from_sft") not in BEYOND:
        return None
    return "scd_aw_from_sft" if variant.endswith("_from_sft") else "scd_aw"


# -----------------------------------------------------------------------------
# per test example: the counts every score and interval is made from


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


def cut_rows(rows: list[dict], task: str, kind: str | None = None) -> list[dict]:
    """Entity rows with each answer cut before its first (mention, type) that equals an earlier one: data.cut_repeats
    on parsed answers (the parser collapses whitespace and skips empty lines, so equal pairs are equal lines), what
    evaluate.py --stop-repeats outputs. Label and exact rows come back as they are: their lines are gone."""
    if not rows or not isinstance(rows[0]["gold"], list):
        return rows
    none_line = data.parse_answer(task, f"{data.NO_ENTITIES}\n{data.NO_ENTITIES}", kind)[:1]  # `None` in an answer
    out = []
    for r in rows:
        seen, k = set(), 0
        while k < len(r["pred"]) and tuple(r["pred"][k]) not in seen:
            seen.add(tuple(r["pred"][k]))
            k += 1
        pred = r["pred"][:k]
        if k < len(r["pred"]) and list(map(tuple, pred)) == none_line:  # cut to the line `None`: no mentions
            pred = []
        out.append({**r, "pred": pred})
    return out


def comparison_pairs(variants: list[str]) -> list[str]:
    """"a - b" for every comparison the report makes: each distilled variant (and the SFT student) against TD and
    against the SFT student, each variant started from the SFT student against TD from it, each
    beyond-the-paper variant against the paper's SCD+AW from the same start, and SCD+AW against each rival."""
    out = [f"{paper} - {v}" for v in variants if v.removesuffix("_from_sft") in RIVALS
           for paper in ["scd_aw_from_sft" if v.endswith("_from_sft") else "scd_aw"] if paper in variants]
    for ref in ("td", "student_sft", "td_from_sft", "scd_aw", "scd_aw_from_sft"):
        for key in ["student_sft", *variants]:
            if ref == "td_from_sft" and not key.endswith("_from_sft"):  # one from the SFT student meets TD from it
                continue
            if ref.startswith("scd_aw") and paper_variant(key) != ref:  # one changed choice meets the paper's SCD+AW
                continue
            if key != ref:
                out.append(f"{key} - {ref}")
    return out


def bootstrap_pairs(counts: dict[str, list[np.ndarray]], pairs: list[str], n_seeds: int) -> dict:
    """paired_bootstrap of every "a - b" of `pairs` whose two models have example_counts for all n_seeds seeds."""
    out = {}
    for pair in pairs:
        a, b = pair.split(" - ")
        if len(counts.get(a, [])) == len(counts.get(b, [])) == n_seeds:
            out[pair] = paired_bootstrap(counts[a], counts[b])
    return out


def n_cut(full: list[dict], cut: list[dict]) -> int:
    """How many answers cut_rows shortened: the answers a decoder with stopping would have ended."""
    return sum(len(a["pred"]) > len(b["pred"]) for a, b in zip(full, cut))


def stopped_scores(rows: dict[str, list[list[dict]]], task: str, kind: str | None, pairs: list[str],
                   n_seeds: int) -> dict:
    """An entity task's scores with every answer cut before its first repeated line (cut_rows), from its rows per
    model and seed: the F1 per seed ("main_stopped"), the answers cut per seed ("n_stopped") and the paired
    intervals of `pairs` ("intervals_stopped")."""
    cut = {key: [cut_rows(r, task, kind) for r in per_seed] for key, per_seed in rows.items()}
    counts = {key: [example_counts(r) for r in per_seed] for key, per_seed in cut.items()}
    return {"main_stopped": {key: [float(f1_of_sums(c.sum(0))) for c in cs] for key, cs in counts.items()},
            "n_stopped": {key: [n_cut(full, short) for full, short in zip(rows[key], cut[key])] for key in rows},
            "intervals_stopped": bootstrap_pairs(counts, pairs, n_seeds)}


def compare(root: Path, task: str, kind: str, seeds: list[int], eval_files: dict, variants: list[str]) -> dict:
    """Write root/predictions/<model>[_s<seed>].jsonl for every evaluated model, and bootstrap the comparison_pairs
    paired over the test examples. Returns "intervals", answer_diagnostics per model and seed ("diagnostics", empty
    for a label task), and for an entity task the stopped_scores too; an answer decoded with stopping was cut as it
    was generated, so its count is the one its eval JSON recorded."""
    rows, recorded, ids = {}, {}, None
    for key, paths in eval_files.items():
        rows[key] = []
        for seed, path in zip(seeds, paths):
            rows[key].append(prediction_rows(path, task, kind))
            if ids is None:
                ids = [r["id"] for r in rows[key][-1]]
            elif [r["id"] for r in rows[key][-1]] != ids:
                raise UserError(f"{path}: scored other test examples than the other models; remove it to re-run")
            name = key if len(paths) == 1 and key != "student_sft" and key not in variants else f"{key}_s{seed}"
            atomic_write_text(root / "predictions" / f"{name}.jsonl",
                              "".join(json.dumps(r) + "\n" for r in rows[key][-1]))
            if "stopped" in (metrics := read_json(path)):
                recorded.setdefault(key, []).append(metrics["stopped"])
    pairs = comparison_pairs(variants)
    out = {"intervals": bootstrap_pairs({k: [example_counts(r) for r in rs] for k, rs in rows.items()}, pairs,
                                        len(seeds)),
           "diagnostics": {k: [answer_diagnostics(r) for r in rs] for k, rs in rows.items() if rs}
           if kind == "entities" else {}}
    if kind == "entities":
        out.update(stopped_scores(rows, task, kind, pairs, len(seeds)))
    if recorded:
        out.setdefault("n_stopped", {}).update(recorded)
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


# -----------------------------------------------------------------------------
# plots and sections


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
        rows = checkpoints.MetricsLog(path).rows()
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
        rows = checkpoints.MetricsLog(path).rows()
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
    index = checkpoints.read_checkpoint_index(root / "teacher")

    def weight_bytes(step: int) -> int:
        return sum(f.stat().st_size for f in checkpoint_files(root / "teacher" / checkpoints.checkpoint_name(step)))

    out = []
    for v in variants:
        flags = VARIANTS[v][1]
        if v.endswith("_from_sft") or not (v == "scd_aw" or "--candidates" in flags) or not main.get(v):
            continue
        n = int(flags[flags.index("--candidates") + 1]) if "--candidates" in flags else len(index["steps"])
        steps = subset_steps(index["steps"], n, "even") if "--candidates" in flags else index["steps"]
        kept = {*steps, index["best"]}  # Metric 1 measures from the best checkpoint, a candidate or not
        out.append({"variant": v, "candidates": n, "checkpoints_kept": len(kept),
                    "storage_gib": sum(map(weight_bytes, kept)) / 2**30, "scores": main[v]})
    return sorted(out, key=lambda r: r["candidates"]) if len(out) > 1 else []


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
        chosen = [r["chosen"] for r in checkpoints.MetricsLog(path).rows()]
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


def scores_section(args, seeds: list[int], results: dict, rows: list[tuple[str, str]], metric: str,
                   command: str) -> list[str]:
    """The report's head (task, preset, machine, the command) and its main table: the test score of every model."""
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    machine = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{os.cpu_count()} cores)"
    return [f"# SCD experiment: {args.task}" + (f" ({args.data}, metric {args.kind})" if args.data else ""), "",
            f"Run {date.today().isoformat()} with the `{args.preset}` preset, seeds {seeds}, on {machine}, "
            f"torch {torch.__version__}.", "", "```", command, "```", "",
            f"## Test {metric} (mean ± std over {len(seeds)} seed{'s' * (len(seeds) > 1)})", "",
            f"Test examples scored: {results.get('n_test', '?')}.", "", *protocol_note(results, rows, metric),
            *score_table(results, rows, metric)]


def protocol_note(results: dict, rows: list[tuple[str, str]], metric: str) -> list[str]:
    """--protocol paper: what every trained row's budget was, and its final checkpoint's score beside the best's."""
    if results.get("protocol") != "paper":
        return []
    lines = ["The paper's protocol (--protocol paper): every trained row (the SFT student and each distillation) ran "
             "10 epochs over the training examples from the model it starts from (distillation: 5 stages of 2 "
             "epochs), and is reported at the best of its 5 checkpoints (every 2 epochs) by the validation "
             f"{metric}; the SFT student's best is AW's reference and the from-SFT variants' start, and the learning "
             "rate search and the SFS/TFS losses read the same checkpoints. The teacher is its SFT run's final "
             "checkpoint in both protocols (its run is the footsteps SCD walks). The final checkpoints scored:", "",
             f"| model | {metric}, final checkpoint | per seed |", "|---|---|---|"]
    final = results.get("main_final", {})
    lines += [f"| {label} | {mean_std(final[key])} | {', '.join(f'{v:.4f}' for v in final[key])} |"
              for label, key in rows if key in final]
    return lines + ["", "At the best checkpoint:", ""]


def score_table(results: dict, rows: list[tuple[str, str]], metric: str) -> list[str]:
    """Every model's test score, mean ± std and per seed. Generated answers decoded to the token cap ("strict", the
    paper's reading) give a second score when they are entities: "stopped", each answer cut before its first
    repeated line (stopped_scores), with the answers cut per seed; decoded with stopping, only that one exists."""
    per_seed = lambda vals: ", ".join(f"{v:.4f}" for v in vals)  # noqa: E731

    def cut(key: str) -> str:  # the answers stopped: the mean over seeds, then each seed's
        n = results.get("n_stopped", {}).get(key, [])
        return f"{statistics.mean(n):.0f}" + (f" ({', '.join(map(str, n))})" if len(n) > 1 else "") if n else "-"

    if results.get("decode") == "stopped":
        lines = ["The answers were decoded with stopping (--decode stopped): each ended before the first line it "
                 "repeated, so there is no strict score.", "",
                 f"| model | {metric}, stopped | per seed | answers stopped, mean (per seed) |", "|---|---|---|---|"]
        return lines + [f"| {label} | {mean_std(results['main'].get(key, []))} | "
                        f"{per_seed(results['main'].get(key, []))} | {cut(key)} |" for label, key in rows]
    if "main_stopped" not in results:
        return ["| model | " + metric + " | per seed |", "|---|---|---|"] + [
            f"| {label} | {mean_std(results['main'].get(key, []))} | {per_seed(results['main'].get(key, []))} |"
            for label, key in rows]
    lines = ["Strict: the answers as decoded, to the token cap (the paper's metric). Stopped: each answer cut before "
             "the first line it repeats, as a decoder that stops there (--decode stopped) would have ended it.", "",
             f"| model | {metric}, strict | per seed | {metric}, stopped | per seed | "
             "answers stopped, mean (per seed) |",
             "|---|---|---|---|---|---|"]
    for label, key in rows:
        strict, stopped = results["main"].get(key, []), results["main_stopped"].get(key, [])
        lines.append(f"| {label} | {mean_std(strict)} | {per_seed(strict)} | {mean_std(stopped)} | "
                     f"{per_seed(stopped)} | {cut(key)} |")
    return lines


def bootstrap_section(results: dict, rows: list[tuple[str, str]], seeds: list[int], metric: str) -> list[str]:
    """One table of the compare() intervals per score (strict and stopped, or the one there is), each row with its
    verdict. Nothing when there is none."""
    tables = {"": results.get("intervals", {})}
    if results.get("decode") == "stopped":
        tables = {"stopped answers": tables[""]}
    elif "intervals_stopped" in results:
        tables = {"strict answers": tables[""], "stopped answers": results["intervals_stopped"]}
    if not any(tables.values()):
        return []
    lines = ["", f"## Paired bootstrap ({BOOTSTRAP} resamples of the {results.get('n_test', '?')} test examples)",
             "", "Each resample draws the test examples with replacement (the same draw for both models and "
             f"every seed) and recomputes the {metric} of both sides from the resampled counts; the interval is "
             "the 2.5th-97.5th percentile of the difference. Pooled = the mean over seeds of the per-seed "
             "difference. That interval holds the test examples' noise, not the training seed's: with several "
             "seeds, the seed interval is the pooled difference ± t(0.975, seeds − 1) × the per-seed "
             "differences' standard deviation / √seeds. A difference holds when it is beyond both."
             + ("" if len(seeds) > 1 else " With one seed the training noise is not measured.")]
    names = {k: label for label, k in rows}
    for title, intervals in tables.items():
        lines += ["", *([f"### {metric}, {title}", ""] if title else []), *interval_table(intervals, names)]
    return lines


def interval_table(intervals: dict, names: dict[str, str]) -> list[str]:
    """A markdown table of paired_bootstrap results, one row per "a - b" (names: model key -> label)."""
    lines = ["| comparison | pooled difference [95 % interval] | seed interval | per seed | beyond them? |",
             "|---|---|---|---|---|"]
    for pair, b in intervals.items():
        a, ref = pair.split(" - ")
        per = ", ".join(f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" for p in b["per_seed"])
        over_seeds = f"[{b['seeds']['lo']:+.4f}, {b['seeds']['hi']:+.4f}]" if "seeds" in b else "-"
        lines.append(f"| {names.get(a, a)} − {names.get(ref, ref)} | {b['diff']:+.4f} [{b['lo']:+.4f}, "
                     f"{b['hi']:+.4f}] | {over_seeds} | {per} | {verdict(b)} |")
    return lines


def diagnostics_section(results: dict, rows: list[tuple[str, str]], metric: str) -> list[str]:
    """answer_diagnostics per model, the mean over seeds. Nothing for a label or exact-match task."""
    if not results.get("diagnostics"):
        return []
    n_gold = next(iter(results["diagnostics"].values()))[0]["n_gold"]
    lines = ["", f"## Where the errors come from (mean over seeds; {n_gold} gold mentions)", "",
             "Precision and recall of the mentions; the mentions predicted; the predicted lines that repeat a "
             "mention the same answer already gave (greedy decoding looping until its token limit: each is a "
             "false positive unless the gold lists that mention as often); and the F1 with those repeats "
             "dropped, every answer read as a set. "
             + ("Decoded with stopping, no answer repeats a line." if results.get("decode") == "stopped" else
                f"The strict {metric} above counts every repeat, as the paper's metric does; the stopped one keeps "
                "each answer up to its first repeat."), "",
             "| model | precision | recall | predicted | repeated | F1 without repeats |",
             "|---|---|---|---|---|---|"]
    for label, key in rows:
        ds = results["diagnostics"].get(key)
        if ds:
            avg = {k: statistics.mean(d[k] for d in ds) for k in ds[0]}
            lines.append(f"| {label} | {avg['precision']:.4f} | {avg['recall']:.4f} | {avg['n_pred']:.0f} | "
                         f"{avg['repeated']:.0f} | {avg['f1_without_repeats']:.4f} |")
    return lines


def lr_section(results: dict, seeds: list[int], metric: str) -> list[str]:
    """The distillation learning rate of each start: the validation score of every rate searched, or given."""
    if not results.get("lr_search"):
        return []
    searched = any(not r.get("given") for r in results["lr_search"].values())
    lines = ["", "## Learning-rate search (seed %d, validation %s)" % (seeds[0], metric) if searched
             else "## Learning rate", ""]
    for start, r in results["lr_search"].items():
        if r.get("given"):
            lines.append(f"- {VARIANTS[r['variant']][0]}: {r['chosen']}, given (a grid of one rate: not searched)")
            continue
        lines.append(f"- {VARIANTS[r['variant']][0]} ({r['n'] or 'all'} val examples): "
                     + ", ".join(f"{lr}: {v:.4f}" for lr, v in r["scores"].items()) + f"; chosen {r['chosen']}")
    return lines


def sides_section(sides: dict, split: dict | None, rows: list[tuple[str, str]], seed: int) -> list[str]:
    """The SFS/TFS shares of the first seed and each model's loss on either side, against the SFT student's."""
    lines = ["", "## SFS / TFS (seed %d, teacher = final checkpoint)" % seed, ""]
    if not split:
        return lines
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
    return lines


def schedule_section(root: Path, seed: int, variants: list[str], note: str) -> list[str]:
    """plot_schedule's plot (or its note) and the checkpoints each scheduled variant chose, stage by stage."""
    lines = ["", "## Schedule", ""]
    lines += [note] if note else ["![teacher checkpoint per stage](schedule.png)"]
    for name in SCHEDULED:
        path = root / f"{name}_s{seed}" / "schedule.jsonl"
        if name in variants and path.exists():
            chosen = [r["chosen"] for r in checkpoints.MetricsLog(path).rows()]
            lines.append(f"- {VARIANTS[name][0]}: checkpoints {chosen}")
    return lines


def model_rows(variants: list[str]) -> list[tuple[str, str]]:
    """(label, model key) of every row of the report's tables: the teacher and the students, then the variants in
    the paper's order, whatever order they ran in."""
    return [("teacher base", "teacher_base"), ("teacher SFT (final)", "teacher"), ("student base", "student_base"),
            ("student SFT", "student_sft"), *((label, v) for v, (label, _) in VARIANTS.items() if v in variants)]


def write_report(root: Path, args, seeds: list[int], results: dict, timings: dict, sides: dict, split: dict | None,
                 note: str, command: str):
    """root/results.md, section by section, and root/results.json with every number in it. `note` is
    plot_schedule's; `sides` and `split` are the first seed's SFS/TFS losses and split."""
    metric = METRICS[args.kind]
    rows = model_rows(args.variants)
    lines = scores_section(args, seeds, results, rows, metric, command)
    lines += bootstrap_section(results, rows, seeds, metric)
    lines += diagnostics_section(results, rows, metric)
    lines += lr_section(results, seeds, metric)
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += sides_section(sides, split, rows, seeds[0])
    lines += stage_sides(root, seeds[0], args.variants, root / "stage_sides.png")
    reading = "stopped" if results.get("decode") == "stopped" else "strict" if "main_stopped" in results else ""
    lines += beyond_section(root, seeds[0], args.variants, results, f"{metric}, {reading}" if reading else metric)
    lines += footsteps_section(root, results.get("footsteps", {}))
    lines += schedule_section(root, seeds[0], args.variants, note)
    atomic_write_text(root / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(root / "results.json", json.dumps({"task": args.task, "preset": args.preset, "seeds": seeds,
                                                         "metric": metric, **results, "timings": timings,
                                                         "sides": sides}, indent=2) + "\n")
