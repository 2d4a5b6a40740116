"""The paper's comparison on one task, end to end, with a report (arXiv 2601.10114, Sec. 4).

    python experiment.py                                   # ncbi_disease, 1 seed, cpu preset (about 70 minutes)
    python experiment.py --task pubmedqa --seeds 3         # three students per variant, one teacher
    python experiment.py --preset gpu --task ncbi_disease  # the paper's sizes
    python experiment.py --quick                           # tiny random models, whole pipeline in ~1 minute
    python experiment.py --variants scd_aw_from_sft,td_from_sft   # distil the SFT student instead of the base one

Stages, each skipped when its output is already complete (and resumed when it was interrupted):
  1. teacher SFT with checkpoint dumps (once per task)        sft.py --role teacher
  2. student SFT, per seed (the frozen AW reference)          sft.py --role student
  3. per-sample losses and the SFS/TFS split, per seed        weights.py
  4. distillation, per variant and seed                       distill.py
       TD      the final teacher only, fixed alpha
       CD      checkpoints in training order, fixed alpha
       SCD     checkpoint chosen by Metric 1 + Metric 2, fixed alpha
       AW      the final teacher only, adaptive weights   (the paper never ran this one)
       SCD+AW  both
     each from the base student; `--variants scd_aw_from_sft,td_from_sft` starts from the seed's SFT student
  5. test-split evaluation of the teacher, the base and SFT students and every variant
Then OUT/TASK/results.md (+ results.json, schedule.png) with mean ± std over seeds, wall time per stage, the SFS/TFS
shares and how each variant moved the student's loss on each side.
"""

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

import data
import distill
import evaluate
import prepare
import sft
import teacher_cache
import weights
from model import UserError, atomic_write_text, load_model, read_json, run_cli

VARIANTS = {  # name -> (label, distill.py flags)
    "td": ("TD", ["--schedule", "td", "--td-ckpt", "final", "--no-aw"]),
    "cd": ("CD", ["--schedule", "cd", "--no-aw"]),
    "scd": ("SCD", ["--schedule", "scd", "--no-aw"]),
    "aw_only": ("AW only", ["--schedule", "td", "--td-ckpt", "final", "--aw"]),
    "scd_aw": ("SCD+AW", ["--schedule", "scd", "--aw"]),
}
DEFAULT_VARIANTS = list(VARIANTS)  # each distils the base student; NAME_from_sft starts from the SFT student
VARIANTS.update({f"{k}_from_sft": (f"{label} from SFT", flags) for k, (label, flags) in VARIANTS.items()})
# variants whose teacher changes by stage -> their line style in the schedule plot
SCHEDULED = {"scd": "o-", "cd": "s--", "scd_aw": "^:",
             "scd_from_sft": "o-.", "cd_from_sft": "s-.", "scd_aw_from_sft": "v-."}
PRESETS = {
    # flags for every training script, the test examples scored, and a generation cap for NER evaluation
    "cpu": dict(train=["--preset", "cpu"], test_size=200, minutes=70),
    "gpu": dict(train=["--preset", "gpu"], test_size=0, minutes=0),
    "quick": dict(train=["--preset", "cpu", "--train-size", "16", "--val-size", "4", "--max-len", "128",
                         "--batch-size", "4", "--epochs", "2", "--dtype", "fp32", "--eval-max-new-tokens", "8"],
                  test_size=8, minutes=1),
}
QUICK_SIZES = {"train_size": 16, "max_len": 128}  # as in the quick flags above
QUICK_DISTILL = ["--stages", "2", "--probe-size", "8", "--max-new-tokens", "8"]
QUICK_TEACHER = ["--save-every", "2", "--lr", "3e-3"]
QUICK_STUDENT = ["--lr", "3e-3"]

# -----------------------------------------------------------------------------
# stage bookkeeping: skip what is complete, resume what was interrupted


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
    max_new = 8 if args.quick else None
    return evaluate.evaluate_dir(model_dir, args.task, "test", args.data_dir, None, test_size, args.eval_batch_size,
                                 max_new, device, args.dtype, out=out, progress=True)

# -----------------------------------------------------------------------------
# the report


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


def write_report(root: Path, args, seeds: list[int], results: dict, timings: dict, sides: dict, split: dict | None,
                 note: str, command: str):
    metric = "accuracy" if args.task == "pubmedqa" else "entity F1"
    rows = [("teacher base", "teacher_base"), ("teacher SFT (final)", "teacher"), ("student base", "student_base"),
            ("student SFT", "student_sft")]
    rows += [(label, v) for v, (label, _) in VARIANTS.items() if v in args.variants]  # paper order, any run order
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    machine = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{torch.get_num_threads()} threads)"
    lines = [f"# SCD experiment: {args.task}", "",
             f"Run {date.today().isoformat()} with the `{args.preset}` preset, seeds {seeds}, on {machine}, "
             f"torch {torch.__version__}.", "", "```", command, "```", "",
             f"## Test {metric} (mean ± std over {len(seeds)} seed{'s' * (len(seeds) > 1)})", "",
             f"Test examples scored: {results.get('n_test', '?')}.", "",
             "| model | " + metric + " | per seed |", "|---|---|---|"]
    for label, key in rows:
        vals = results["main"].get(key, [])
        lines.append(f"| {label} | {mean_std(vals)} | {', '.join(f'{v:.4f}' for v in vals)} |")
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="ncbi_disease", help="ncbi_disease, bc5cdr or pubmedqa")
    p.add_argument("--seeds", type=int, default=1, help="students per variant (seeds 0..N-1); one teacher")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="sizes of every stage")
    p.add_argument("--quick", action="store_true", help="tiny random models with the real tokenizer and data: "
                                                        "the whole pipeline in about a minute (smoke test)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from " + ",".join(DEFAULT_VARIANTS) + "; add _from_sft to a name to "
                        "start that distillation from the seed's SFT student instead of the base student")
    p.add_argument("--out", default="runs/experiment", help="root dir; everything goes to OUT/TASK/")
    p.add_argument("--models", default="models", help="dir with teacher/ and student/ (made by prepare.py)")
    p.add_argument("--data-dir", default=None, help="directory with the built-in tasks' files")
    p.add_argument("--test-size", type=int, default=None, help="test examples to score (0 = all; cpu preset 200)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--eval-batch-size", type=int, default=16, help="batch size of evaluation")
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
    if args.task == "jsonl":
        raise UserError("--task jsonl: run sft.py/distill.py directly with --data; the experiment is for built-in "
                        "tasks")
    data.get_task(args.task)  # refuses an unknown task now, not an hour in
    preset = PRESETS["quick" if args.quick else args.preset]
    if args.quick:
        args.preset = "quick"
    test_size = preset["test_size"] if args.test_size is None else args.test_size
    sizes = QUICK_SIZES if args.quick else {k: sft.PRESETS[args.preset][k] for k in QUICK_SIZES}
    device = sft.resolve_device(args.device)
    args.dtype = "fp32" if args.quick else sft.resolve_dtype("auto", device)  # as sft.py's presets
    seeds = list(range(args.seeds))
    command = shlex.join(["python", "experiment.py", *(sys.argv[1:] if argv is None else argv)])

    root = Path(args.out) / (f"{args.task}_quick" if args.quick else args.task)
    root.mkdir(parents=True, exist_ok=True)
    models = Path(args.models)
    if args.quick:  # tiny random teacher and student that carry the real tokenizer
        prepare.main(["--out-dir", str(models)])
        for name, layers in (("teacher", 2), ("student", 1)):
            if not (root / "models" / name / "model.safetensors").exists():
                prepare.build_tiny(root / "models" / name, models / "teacher", n_layers=layers, seed=layers)
        models = root / "models"
    elif not (models / "teacher" / "config.json").exists() or not (models / "student" / "config.json").exists():
        raise UserError(f"--models {models}: no teacher/ and student/ there; run python prepare.py first")
    n_runs = 2 + len(seeds) * (2 + len(args.variants))
    print(f"experiment {args.task}: preset {args.preset}, seeds {seeds}, variants {args.variants}: {n_runs} runs; "
          + (f"expected about {preset['minutes'] * (1 + 0.7 * (len(seeds) - 1)):.0f} minutes on 2 CPU cores"
             if preset["minutes"] else "on a GPU, a few hours at the paper's sizes") + f" -> {root}")

    timer = Timer(root / "timings.json")
    common = [*preset["train"], "--task", args.task, "--device", str(device),
              *(["--data-dir", args.data_dir] if args.data_dir else [])]
    teacher_run = root / "teacher"
    flags = run_flags(teacher_run, sft_done(teacher_run), sft.latest_resumable(teacher_run) is not None
                      if teacher_run.exists() else False)
    if flags is not None:
        timer.run("teacher SFT", sft.main, ["--role", "teacher", "--model", str(models / "teacher"), "--out",
                                            str(teacher_run), *common, *(QUICK_TEACHER if args.quick else []),
                                            *flags])
    index = sft.read_checkpoint_index(teacher_run)
    results = {"main": {k: [] for k in ["teacher_base", "teacher", "student_base", "student_sft", *args.variants]}}
    evals = root / "evals"
    teacher_final = teacher_run / sft.checkpoint_name(index["final"])
    for key, model_dir in (("teacher_base", models / "teacher"), ("teacher", teacher_final),
                           ("student_base", models / "student")):
        m = timer.run(f"eval {key}", test_eval, model_dir, evals / f"{key}.json", args, test_size, device,
                      cached=evals / f"{key}.json")
        results["main"][key] = [m["main"]]
        results["n_test"] = m["n"]

    cache_flags = []
    if args.teacher_cache != "none":  # once per teacher; every variant and seed reads it
        cache_dir = root / "teacher_cache"
        probe_size = QUICK_DISTILL[QUICK_DISTILL.index("--probe-size") + 1] if args.quick else "32"
        build = [teacher_cache.main, ["--teacher", str(teacher_run), "--out", str(cache_dir), "--tokenizer",
                                      str(models / "student"), "--form", args.teacher_cache, "--top-k",
                                      str(args.top_k), "--precision", args.cache_precision, "--seeds",
                                      ",".join(map(str, seeds)), "--probe-size", probe_size, "--task", args.task,
                                      "--train-size", str(sizes["train_size"]), "--max-len", str(sizes["max_len"]),
                                      "--dtype", args.dtype, "--device",
                                      str(device), *(["--data-dir", args.data_dir] if args.data_dir else [])]]
        if "teacher cache" in timer.times and (cache_dir / teacher_cache.MANIFEST).exists():
            build[0](build[1])  # checks the cache; writes only what a changed teacher needs, so it keeps its time
        else:
            timer.run("teacher cache", *build)
        cache_flags = ["--teacher-cache", str(cache_dir)]

    sides, split = {}, None
    for seed in seeds:
        s_common = [*common, "--seed", str(seed)]
        student_run = root / f"student_s{seed}"
        flags = run_flags(student_run, sft_done(student_run), student_run.exists()
                          and sft.latest_resumable(student_run) is not None)
        if flags is not None:
            timer.run(f"student SFT s{seed}", sft.main, ["--role", "student", "--model", str(models / "student"),
                                                         "--out", str(student_run), *s_common,
                                                         *(QUICK_STUDENT if args.quick else []), *flags])
        student_final = weights.student_sft_checkpoint(student_run)
        path = evals / f"student_sft_s{seed}.json"
        m = timer.run(f"eval student SFT s{seed}", test_eval, student_final, path, args, test_size, device,
                      cached=path)
        results["main"]["student_sft"].append(m["main"])

        aw_dir = root / f"weights_s{seed}"
        if not (aw_dir / "sfs_tfs.json").exists():
            timer.run(f"weights s{seed}", weights.main, ["--teacher", str(teacher_run), "--student-sft",
                                                         str(student_run), "--out", str(aw_dir), "--task", args.task,
                                                         "--preset", "cpu" if args.quick else args.preset,
                                                         "--train-size", str(sizes["train_size"]),
                                                         "--max-len", str(sizes["max_len"]),
                                                         "--dtype", args.dtype, "--device", str(device)])
        for variant in args.variants:
            out = root / f"{variant}_s{seed}"
            done = (out / "final" / f"eval_{args.task}_test.json").exists()
            flags = run_flags(out, done, (out / "resume").exists())
            if flags is not None:
                timer.run(f"distill {variant} s{seed}", distill.main, [
                    *VARIANTS[variant][1], "--teacher", str(teacher_run), "--student-sft", str(student_run),
                    "--init", str(student_final if variant.endswith("_from_sft") else models / "student"),
                    "--aw-table", str(aw_dir / "losses.safetensors"),
                    "--variant", variant, "--out", str(out), "--eval-size", str(test_size),
                    "--probe-cache", str(root / "probe_cache"), *cache_flags, *s_common,
                    *(QUICK_DISTILL if args.quick else []), *flags])
            results["main"][variant].append(read_json(out / "final" / f"eval_{args.task}_test.json")["main"])

        if seed == seeds[0]:  # the paper's theory, measured on the first seed: loss on SFS and TFS examples
            analysis = read_json(aw_dir / "sfs_tfs.json")
            split = next((v for k, v in analysis.items() if k.startswith("final")), next(iter(analysis.values())))
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
                    sft_args = argparse.Namespace(task=args.task, data=None, data_dir=args.data_dir,
                                                  max_len=sizes["max_len"], refuse_long=False)
                    _, train_items = sft.load_split(tok, sft_args, "train", sizes["train_size"])
                    items = {it["id"]: it for it in train_items}
                sides[key] = side_losses(model_dir, split, items, tok.pad_id, device, args.dtype)
                atomic_write_text(sides_path, json.dumps(sides, indent=2) + "\n")

    note = plot_schedule(root, seeds[0], args.variants, root / "schedule.png")
    write_report(root, args, seeds, results, timer.times, sides, split, note, command)
    print((root / "results.md").read_text())


if __name__ == "__main__":
    run_cli(main)
