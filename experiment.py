"""The paper's comparison on one task, end to end, with a report (arXiv 2601.10114, Sec. 4).

    python experiment.py                                   # ncbi_disease, 1 seed, cpu preset
    python experiment.py --task pubmedqa --seeds 3         # three students per variant, one teacher
    python experiment.py --preset gpu --task ncbi_disease  # the paper's sizes
    python experiment.py --quick                           # tiny random models, the whole pipeline (smoke test)
    python experiment.py --variants scd_aw_from_sft,td_from_sft   # distil the SFT student instead of the base one
    python experiment.py --task jsonl --data train.jsonl,val.jsonl,test.jsonl   # your own task (see data.py)

Stages, in main's order, each skipped when its output is already complete (and resumed when it was interrupted); the
settings that decide them are kept in OUT/TASK/experiment.json, and another invocation with other settings is refused:
  0. the healed student, when --models has none (once)       heal.py
  1. teacher SFT with checkpoint dumps (once per task)        sft.py --role teacher
  2. student SFT, per seed (the frozen AW reference)          sft.py --role student
  3. per-sample losses and the SFS/TFS split, per seed        weights.py
  4. distillation, per variant and seed (report.VARIANTS)     distill.py
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
Then the first seed's SFS/TFS losses of every model, and the report (report.py) in OUT/TASK/results.md. A finished
distillation keeps final/ and its logs, not its resume state or (without --keep-stages) its stage exports.

Generated answers end before the first line they repeat (--decode stopped: a greedy loop would run to the token cap)
in every test and distillation evaluation. --decode strict decodes to the cap, as the paper's metric reads them, and
the report then gives both scores (the stopped one cut from the strict answers). A root whose experiment.json
does not say how it decoded (or which protocol it ran) decoded strictly (and ran the short protocol).
"""

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoints
import data
import distill
import evaluate
import heal
import prepare
import report
import runtime
import schedule
import sft
import teacher_cache
import train
import weights
from checkpoints import model_fingerprint
from flags import PRESETS as TRAIN_PRESETS
from footsteps import SPACINGS
from model import load_model
from report import DEFAULT_VARIANTS, VARIANTS, paper_variant
from runtime import UserError, atomic_write_text, read_json, run_cli

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
QUICK_SIZES = {"train_size": 16, "max_len": 128}  # as in the quick flags above
QUICK_MAX_NEW = 8  # the quick preset's generation cap, for tasks that generate their answers
QUICK_DISTILL = ["--stages", "2"]
QUICK_PROBE = ["--probe-size", "8"]  # SCD variants only
# the paper's protocol (--protocol paper): every trained row gets 10 epochs over the training examples from the model
# it starts from, and is reported at the best of 5 checkpoints (every 2 epochs) by the validation task metric, beside
# its final one. The short protocol: the SFT student's 3 epochs, distillation in the same budget, final checkpoints.
PROTOCOLS = {"short": dict(student=[], distill=[]),
             "paper": dict(student=["--epochs", "10", "--checkpoints", "5"],
                           distill=["--stage-epochs", "2", "--val-metric"])}
QUICK_PROTOCOLS = {"short": PROTOCOLS["short"],
                   "paper": dict(student=["--epochs", "4", "--checkpoints", "2"],
                                 distill=["--stage-epochs", "1", "--val-metric"])}
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
        # settings a root does not record have their values from before the flags existed
        old = {**report.SETTINGS_BEFORE, **read_json(path)}
        diff = checkpoints.config_diff(old, json.loads(json.dumps(settings)))
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
    index = out / checkpoints.CHECKPOINT_INDEX
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


def without(flags: list[str], flag: str) -> list[str]:
    """flags with `flag` and its value left out (--stage-epochs sets what --epochs would)."""
    out, skip = [], False
    for f in flags:
        if f == flag or skip:
            skip = f == flag
            continue
        out.append(f)
    return out


def prune_run(out: Path, keep_stages: bool):
    """A finished distillation needs its resume state no more, and the report reads only final/, schedule.jsonl and
    metrics.jsonl: drop resume/ and, unless asked to keep them, the stage_XX exports (one student copy each)."""
    stages = [] if keep_stages else [d for d in out.glob("stage_*") if re.fullmatch(r"stage_\d+", d.name)]
    for d in [out / "resume", *stages]:
        if d.is_dir():
            shutil.rmtree(d)


# -----------------------------------------------------------------------------
# the runs each stage starts


def test_eval(model_dir: Path, out: Path, args, test_size: int, device) -> dict:
    """Test metrics of a model dir, written to `out` (JSON)."""
    max_new = QUICK_MAX_NEW if args.quick and args.kind != "choices" else None
    test_file = data.split_file(args.data, "test") if args.data else None  # with the training file's header
    return evaluate.evaluate_dir(model_dir, args.task, "test", args.data_dir, test_file, test_size,
                                 args.eval_batch_size, max_new, device, args.dtype, out=out, progress=True,
                                 metric=args.metric, stop_repeats=args.decode == "stopped")


def distill_flags(variant: str, args, root: Path, aw_dir: Path, student_sft: Path) -> list[str]:
    """A variant's own flags: AW's reference only for AW variants, SCD's probe only for SCD (distill.py refuses
    flags its run would ignore)."""
    flags = VARIANTS[variant][1]
    out = list(flags)
    if "--aw" in flags and "current" not in flags:  # the dynamic anchor needs no frozen SFT student
        out += ["--student-sft", str(student_sft), "--aw-table", str(aw_dir / "losses.safetensors")]
    if flags[flags.index("--schedule") + 1] == "scd":  # the probe's rows come from the teacher cache when there is one
        out += [*(["--probe-cache", str(root / "probe_cache")] if args.teacher_cache == "none" else []),
                *(QUICK_PROBE if args.quick else [])]
    if args.quick and args.kind != "choices":
        out += ["--max-new-tokens", str(QUICK_MAX_NEW)]
    return out


def side_losses(model_dir: Path, split: dict, items_by_id: dict, pad_id: int, device, dtype: str) -> dict:
    """Mean answer CE of a model on the SFS and on the TFS training examples."""
    model = load_model(model_dir, device=device)
    out = {}
    for side in ("sfs", "tfs"):
        items = [items_by_id[i] for i in split[f"{side}_ids"] if i in items_by_id]
        losses = weights.sample_losses(model, items, pad_id, 16, device, dtype) if items else torch.zeros(0)
        out[side] = float(losses.mean()) if len(losses) else None
    return out


def metric1_by_spacing(root: Path, args, runs: dict[str, Path], tok, sizes: dict, device) -> dict:
    """Metric 1 (KL from the run's best checkpoint) and val loss per checkpoint of each spacing's teacher run, on
    seed 0's probe set: how far apart the footsteps SCD can choose from are. Written to root/footsteps.json; the
    probe log-probs behind it are deleted once it is."""
    path = root / "footsteps.json"
    out = read_json(path) if path.exists() else {}
    if all(spacing in out for spacing in runs):
        return {spacing: out[spacing] for spacing in runs}
    sft_args = argparse.Namespace(task=args.task, data=args.data, data_dir=args.data_dir, metric=args.metric,
                                  max_len=sizes["max_len"], refuse_long=False)
    _, items = train.load_split(tok, sft_args, "train", sizes["train_size"])
    probe = schedule.probe_items(items, int(QUICK_PROBE[1] if args.quick else schedule.PROBE_SIZE), 0)
    for spacing, run in runs.items():
        if spacing in out:
            continue
        index, ckpts = checkpoints.read_checkpoint_index(run), checkpoints.list_checkpoints(run)
        cache = schedule.ProbeCache(root / "footsteps_probe", probe, ckpts, args.dtype, device, tok.files)
        best = cache.build(tok.pad_id, args.eval_batch_size).load(index["best"])
        out[spacing] = {"run": str(run), "best": index["best"], "final": index["final"], "checkpoints": [
            {"step": step, "metric1": schedule.metric1(best, cache.load(step)),
             "val_loss": read_json(ckpt / "meta.json").get("val_loss")} for step, ckpt in ckpts]}
        atomic_write_text(path, json.dumps(out, indent=2) + "\n")
        shutil.rmtree(cache.dir)
    return {spacing: out[spacing] for spacing in runs}


# -----------------------------------------------------------------------------
# the flags


def flag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="ncbi_disease", help="ncbi_disease, bc5cdr, pubmedqa or jsonl (with --data)")
    p.add_argument("--data", default=None, help="--task jsonl: train,val,test JSONL files, comma-separated")
    p.add_argument("--metric", choices=data.METRICS, default=None,
                   help="how --task jsonl is scored when its files do not say (see data.py)")
    p.add_argument("--seeds", type=int, default=1, help="students per variant (seeds 0..N-1); one teacher")
    p.add_argument("--teacher-only", action="store_true", help="the teacher's stages alone (its SFT, test scores, "
                   "cache and --spacings teachers), which need no student: run beside python heal.py on a machine "
                   "with room for both, then, once both have ended, the same command (the same --seeds: the cache's "
                   "probe sets) without this flag")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds K..N-1 only: more seeds for a set whose "
                   "first ones ran elsewhere (pool the reports with python rescore.py --pool)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="sizes of every stage")
    p.add_argument("--quick", action="store_true", help="tiny random models with the real tokenizer and data: "
                                                        "the whole pipeline in small (smoke test)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from " + ",".join(DEFAULT_VARIANTS) + ", the rivals taid and gkd, and the "
                        "beyond-the-paper scd_aw_* (report.py); add _from_sft to a name to start that distillation "
                        "from the seed's SFT student instead of the base student")
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
    p.add_argument("--decode", choices=["stopped", "strict"], default=None,
                   help="how generated answers end in every test and distillation evaluation: stopped before the "
                        "first line they repeat (evaluate.py --stop-repeats), or strict, at the token cap as the "
                        "paper's metric reads them (the report then gives the stopped score too, cut from them); "
                        "default stopped, strict for a task of scored options, which generates nothing to stop")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="short",
                   help="short: the SFT student's 3 epochs, each distillation in the same budget, final checkpoints; "
                        "paper: every trained row 10 epochs from where it starts (distillation: 5 stages of 2 epochs, "
                        "the paper's T), reported at the best of 5 checkpoints by the validation task metric beside "
                        "the final one; the SFT student's best is AW's reference and the from-SFT start")
    p.add_argument("--cache-precision", choices=sorted(teacher_cache.PRECISIONS), default="fp32",
                   help="on-disk dtype of the cached log-probs; fp32 distils as the teacher model would, to fp "
                        "rounding; fp16 halves the disk it takes")
    return p


def parse_flags(argv) -> argparse.Namespace:
    """The flags, checked before anything runs (each error names its flag) and resolved in place: the variants (a
    beyond-the-paper one brings the paper's SCD+AW along), the spacings, the test file and answer kind, how answers
    end (--decode), the preset and the lr grids."""
    p = flag_parser()
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or args.seeds < 1:
        raise UserError(f"--variants {unknown[0]!r}: unknown" if unknown else "--seeds must be at least 1")
    if not 0 <= args.first_seed < args.seeds:
        raise UserError(f"--first-seed {args.first_seed}: expected 0 to --seeds - 1 ({args.seeds - 1})")
    for v in list(args.variants):  # a changed choice is measured against the paper's SCD+AW from the same start
        if paper_variant(v) and paper_variant(v) not in args.variants:
            args.variants.insert(args.variants.index(v), paper_variant(v))
    args.spacings = [x for x in args.spacings.split(",") if x]
    bad = [x for x in args.spacings if x not in SPACINGS or x == "even"]
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
        examples = data.load_examples("jsonl", "test", data_file=data.split_file(args.data, "test"), metric=args.metric)
    args.kind = data.answer_kind(args.task, examples)
    if args.kind == "choices" and args.decode == "stopped":
        raise UserError(f"--decode stopped: {args.task}'s answers are options scored, not generated; nothing to stop")
    args.decode = args.decode or ("strict" if args.kind == "choices" else "stopped")
    preset = PRESETS["quick" if args.quick else args.preset]
    if args.quick:
        args.preset = "quick"
    for key in ("lr_grid", "sft_lr_grid"):
        grid = preset[key] if getattr(args, key) is None else getattr(args, key)
        try:
            setattr(args, key, [f"{float(x):g}" for x in grid.split(",") if x.strip()])
        except ValueError:
            raise UserError(f"--{key.replace('_', '-')} {grid!r}: expected comma-separated learning rates") from None
    for key in ("lr_grid", "sft_lr_grid"):  # the search runs on the first seed: seed 0's rate is the one to give
        if args.first_seed and len(getattr(args, key)) > 1 and (key == "lr_grid" or any(
                v.endswith("_from_sft") for v in args.variants)):
            flag = key.replace("_", "-")
            raise UserError(f"--first-seed {args.first_seed}: the --{flag} search would run on seed "
                            f"{args.first_seed}; give the rate seed 0's search chose as a one-rate --{flag}")
    return args


# -----------------------------------------------------------------------------
# the stages, in main's order


@dataclass
class Experiment:
    """What the stages share: the checked flags and what they resolve to, the paths, the stage timer, and what the
    runs give the report, filled in stage by stage."""
    args: argparse.Namespace
    preset: dict  # PRESETS[args.preset]
    test_size: int  # test examples scored (0 = all)
    sizes: dict  # the training subset (train_size, max_len) that weights.py, the caches and the probes read
    device: torch.device
    seeds: list[int]
    command: str  # this invocation, as the report quotes it
    root: Path  # OUT/TASK: every output
    models: Path  # teacher/ and student/
    timer: Timer
    task_flags: list[str]  # the task, as every script takes it
    common: list[str]  # every training run's flags
    quick_eval: list[str]  # --quick: the generation cap of SFT's validation
    protocol: dict  # PROTOCOLS[args.protocol]: the student SFT's and every distillation's own flags
    stop_flags: list[str]  # --stop-repeats where answers are decoded with stopping
    teacher_final: Path | None = None  # the teacher SFT's final checkpoint, once it has trained
    teacher_steps: int = 0  # how many checkpoints it saved: the other spacings save as many
    results: dict = field(default_factory=dict)  # what report.write_report reads: "main" = test scores per model
    eval_files: dict = field(default_factory=dict)  # model -> its test eval JSON per seed
    lr_search: dict = field(default_factory=dict)  # start ("base", "sft") -> the distillation lr chosen or given
    sides: dict = field(default_factory=dict)  # model -> its SFS and TFS loss, on the first seed
    split: dict | None = None  # the first seed's SFS/TFS split
    cache: tuple[str, ...] | None = None  # distill.py's teacher-cache flags, once asked for

    @property
    def teacher_run(self) -> Path:
        return self.root / "teacher"


@dataclass
class Student:
    """One seed's SFT student, and what that seed's distillations read."""
    seed: int
    run: Path  # its SFT run
    model: Path  # AW's frozen reference and the from-SFT variants' start: its final (or, --protocol paper, best)
    aw_dir: Path  # weights.py's per-sample loss table and SFS/TFS split
    flags: list[str]  # every training run's flags, with the seed


def root_dir(args: argparse.Namespace) -> Path:
    """OUT/TASK: OUT/jsonl_<name> for a JSONL task, named after its test file; _quick for --quick."""
    name = f"jsonl_{Path(args.test_file).stem.removesuffix('.test').removesuffix('_test')}" if args.test_file \
        else args.task
    return Path(args.out) / (f"{name}_quick" if args.quick else name)


def setup(args: argparse.Namespace, argv) -> Experiment:
    """What the flags resolve to, the output root, --quick's tiny models; the plan, printed."""
    preset = PRESETS[args.preset]
    test_size = preset["test_size"] if args.test_size is None else args.test_size
    sizes = QUICK_SIZES if args.quick else {k: TRAIN_PRESETS[args.preset][k] for k in QUICK_SIZES}
    device = runtime.resolve_device(args.device)
    args.dtype = "fp32" if args.quick else runtime.resolve_dtype("auto", device)  # as sft.py's presets
    seeds = list(range(args.first_seed, args.seeds))
    command = shlex.join(["python", "experiment.py", *(sys.argv[1:] if argv is None else argv)])

    root = root_dir(args)
    earlier = [k for k in range(args.first_seed) if (root / f"student_s{k}").exists()]
    if earlier:  # its report would leave them out, and the first seed's analysis is kept by model, not by seed
        raise UserError(f"--first-seed {args.first_seed}: {root} holds seed {earlier[0]}'s runs; --seeds {args.seeds} "
                        "without --first-seed continues it there, or give another --out")
    root.mkdir(parents=True, exist_ok=True)
    models = Path(args.models)
    if args.quick:  # tiny random teacher and student that carry the real tokenizer
        prepare.main(["--out-dir", str(models)])
        for name, layers in (("teacher", 2), ("student", 1))[:1 if args.teacher_only else 2]:
            if not (root / "models" / name / "model.safetensors").exists():
                prepare.build_tiny(root / "models" / name, models / "teacher", n_layers=layers, seed=layers)
        models = root / "models"
    elif not (models / "teacher" / "config.json").exists():
        raise UserError(f"--models {models}: no teacher/ there; run python prepare.py first")
    searched = [g for g in (args.lr_grid, args.sft_lr_grid if any(v.endswith("_from_sft") for v in args.variants)
                            else []) if len(g) > 1]  # a grid of one rate is used as given
    grid_runs = sum(len(g) for g in searched)
    n_runs = 1 + len(args.spacings) if args.teacher_only else \
        2 + len(args.spacings) + grid_runs + len(seeds) * (2 + len(args.variants))
    print(f"experiment {args.task}: preset {args.preset}, seeds {seeds}, variants {args.variants}: {n_runs} training "
          f"runs ({grid_runs} of them the learning-rate search); docs/experiment.md lists what each took -> {root}")

    task_flags = ["--task", args.task, *(["--data", args.data] if args.data else []),
                  *(["--metric", args.metric] if args.metric else []),
                  *(["--data-dir", args.data_dir] if args.data_dir else [])]
    return Experiment(args, preset, test_size, sizes, device, seeds, command, root, models,
                      timer=Timer(root / "timings.json"), task_flags=task_flags,
                      common=[*preset["train"], *task_flags, "--device", str(device)],
                      quick_eval=["--eval-max-new-tokens", str(QUICK_MAX_NEW)]
                      if args.quick and args.kind != "choices" else [],
                      protocol=(QUICK_PROTOCOLS if args.quick else PROTOCOLS)[args.protocol],
                      stop_flags=["--stop-repeats"] if args.decode == "stopped" else [])


def heal_and_check(ex: Experiment):
    """The healed student, made once for all tasks when --models has none; one heal.py did not make is used only
    with --no-heal. Then the settings are recorded, or refused when this root's finished stages had others."""
    args, student_dir = ex.args, ex.models / "student"
    if not args.quick and not (student_dir / "config.json").exists():
        heal_run = Path(args.out) / "heal"
        flags = run_flags(heal_run, False, checkpoints.latest_resumable(heal_run) is not None)
        ex.timer.run("heal student", heal.main, [
            "--teacher", str(ex.models / "teacher"), "--export", str(student_dir), "--out", str(heal_run),
            "--device", str(ex.device), *(["--data-dir", args.data_dir] if args.data_dir and not args.data else []),
            *flags])
    elif not args.quick and not (student_dir / "heal.json").exists() and args.heal:
        raise UserError(f"--models {ex.models}: student/ was not made by heal.py (no heal.json); run python heal.py "
                        "--overwrite to heal the default student, or pass --no-heal to use this one as it is")
    record_settings(ex)


def record_settings(ex: Experiment):
    """check_settings on what this invocation's stages depend on; the student's fingerprint once there is one (a
    --teacher-only run beside heal.py has none yet, and the first full run adds it)."""
    args, student_dir = ex.args, ex.models / "student"
    path = ex.root / "experiment.json"
    recorded = read_json(path).get("models", {}) if path.exists() else {}
    models = {"teacher": model_fingerprint(ex.models / "teacher")}
    if (student_dir / "config.json").exists():
        models["student"] = model_fingerprint(student_dir)
    elif "student" in recorded:  # one recorded before stays, so the next full run is checked on it
        models["student"] = recorded["student"]
    check_settings(ex.root, {"task": args.task, "data": args.data, "metric": args.metric, "preset": args.preset,
                             "decode": args.decode, "protocol": args.protocol,
                             "test_size": ex.test_size, "lr_grid": args.lr_grid, "sft_lr_grid": args.sft_lr_grid,
                             "teacher_checkpoints": args.teacher_checkpoints, "teacher_cache": args.teacher_cache,
                             "top_k": args.top_k if args.teacher_cache == "topk" else None,
                             "cache_precision": args.cache_precision,
                             "models": models})


def teacher_sft(ex: Experiment):
    """The teacher's SFT with its checkpoint dumps, once per task; then the test scores of the teacher before and
    after it and of the base student."""
    args, teacher_run = ex.args, ex.teacher_run
    flags = run_flags(teacher_run, sft_done(teacher_run), checkpoints.latest_resumable(teacher_run) is not None
                      if teacher_run.exists() else False)
    if flags is not None:
        ex.timer.run("teacher SFT", sft.main, ["--role", "teacher", "--model", str(ex.models / "teacher"), "--out",
                                               str(teacher_run), *ex.common, *ex.quick_eval,
                                               *(["--checkpoints", str(args.teacher_checkpoints)]
                                                 if args.teacher_checkpoints else []),
                                               *(QUICK_TEACHER if args.quick else []), *flags])
    index = checkpoints.read_checkpoint_index(teacher_run)
    ex.teacher_steps = len(index["steps"])
    ex.results = {"main": {k: [] for k in ["teacher_base", "teacher", "student_base", "student_sft", *args.variants]},
                  "main_final": {}, "protocol": args.protocol}
    ex.eval_files = {k: [] for k in ex.results["main"]}
    ex.teacher_final = teacher_run / checkpoints.checkpoint_name(index["final"])
    evals = ex.root / "evals"
    for key, model_dir in (("teacher_base", ex.models / "teacher"), ("teacher", ex.teacher_final),
                           ("student_base", ex.models / "student")):
        if key == "student_base" and ex.args.teacher_only:  # beside heal.py: no student yet, or a half-made one
            continue
        m = ex.timer.run(f"eval {key}", test_eval, model_dir, evals / f"{key}.json", args, ex.test_size, ex.device,
                         cached=evals / f"{key}.json")
        ex.results["main"][key] = [m["main"]]
        ex.results["n_test"] = m["n"]
        ex.eval_files[key] = [evals / f"{key}.json"]


def cache_flags(ex: Experiment) -> tuple[str, ...]:
    """The teacher cache, once per teacher, every variant and seed reads it: built (or checked) when the first
    distillation with work left asks for it, so a run that only writes the report again needs no cache."""
    if ex.cache is not None:
        return ex.cache
    args = ex.args
    if args.teacher_cache == "none":
        ex.cache = ()
        return ex.cache
    cache_dir = ex.root / "teacher_cache"
    probe_size = QUICK_PROBE[1] if args.quick else str(schedule.PROBE_SIZE)
    # the data encoded as distill.py will (the student's tokenizer); before heal (--teacher-only) the teacher's, and
    # the cache key holds the encoding, so the full run's check rebuilds the cache if the two differ
    student = ex.models / "student"
    tok = student if (student / "config.json").exists() else ex.models / "teacher"
    build = [teacher_cache.main, ["--teacher", str(ex.teacher_run), "--out", str(cache_dir), "--tokenizer",
                                  str(tok), "--form", args.teacher_cache, "--top-k",
                                  str(args.top_k), "--precision", args.cache_precision, "--seeds",
                                  ",".join(map(str, ex.seeds)), "--probe-size", probe_size, *ex.task_flags,
                                  "--train-size", str(ex.sizes["train_size"]), "--max-len", str(ex.sizes["max_len"]),
                                  "--dtype", args.dtype, "--device", str(ex.device)]]
    if "teacher cache" in ex.timer.times and (cache_dir / teacher_cache.MANIFEST).exists():
        build[0](build[1])  # checks the cache; writes only what a changed teacher needs, so it keeps its time
    else:
        ex.timer.run("teacher cache", *build)
    ex.cache = ("--teacher-cache", str(cache_dir))
    return ex.cache


def other_spacings(ex: Experiment):
    """The same teacher recipe saved at other steps (--spacings), and Metric 1 per checkpoint of each run beside the
    evenly spaced one's: how far apart are its footsteps?"""
    args = ex.args
    runs = {"even": ex.teacher_run}
    measured = read_json(ex.root / "footsteps.json") if (ex.root / "footsteps.json").exists() else {}
    for spacing in args.spacings:
        runs[spacing] = ex.root / f"teacher_{spacing}"
        flags = run_flags(runs[spacing], sft_done(runs[spacing]), runs[spacing].exists()
                          and checkpoints.latest_resumable(runs[spacing]) is not None)
        if flags is not None and spacing not in measured:  # once measured, its checkpoints may be deleted
            count = ["--checkpoints", str(args.teacher_checkpoints or ex.teacher_steps)]
            ex.timer.run(f"teacher SFT {spacing}", sft.main, [
                "--role", "teacher", "--model", str(ex.models / "teacher"), "--out", str(runs[spacing]), *ex.common,
                *ex.quick_eval, "--spacing", spacing, *count, *(QUICK_STUDENT if args.quick else []), *flags])
    tok = data.load_tokenizer(ex.models / "teacher")
    ex.results["footsteps"] = metric1_by_spacing(ex.root, args, runs, tok, ex.sizes, ex.device)


def student_sft(ex: Experiment, seed: int) -> Student:
    """One seed's student SFT (the frozen AW reference), and its test score."""
    args = ex.args
    s_common = [*ex.common, "--seed", str(seed)]
    student_run = ex.root / f"student_s{seed}"
    flags = run_flags(student_run, sft_done(student_run), student_run.exists()
                      and checkpoints.latest_resumable(student_run) is not None)
    if flags is not None:
        ex.timer.run(f"student SFT s{seed}", sft.main, ["--role", "student", "--model", str(ex.models / "student"),
                                                        "--out", str(student_run), *s_common, *ex.quick_eval,
                                                        *(QUICK_STUDENT if args.quick else []),
                                                        *ex.protocol["student"], *ex.stop_flags, *flags])
    final = checkpoints.final_checkpoint(student_run)
    model = final
    if args.protocol == "paper":  # the paper's SFT student: its best checkpoint by the validation metric
        model = checkpoints.best_by_metric(student_run) or final
    scored = {"best": model, "final": final} if args.protocol == "paper" else {"best": model}
    for role, which in scored.items():  # the row is the model the student's runs use; the final one beside it
        path = ex.root / "evals" / f"student_sft{'_final' if role == 'final' else ''}_s{seed}.json"
        m = ex.timer.run(f"eval student SFT{' final' if role == 'final' else ''} s{seed}", test_eval, which, path,
                         args, ex.test_size, ex.device, cached=path)
        if role == "best":
            ex.results["main"]["student_sft"].append(m["main"])
            ex.eval_files["student_sft"].append(path)
        else:
            ex.results["main_final"].setdefault("student_sft", []).append(m["main"])
    return Student(seed, student_run, model, ex.root / f"weights_s{seed}", s_common)


def aw_table(ex: Experiment, student: Student):
    """weights.py on one seed: every training example's loss under the SFT student (AW's L_stuSFT) and under the
    best and the final teacher (the SFS/TFS split); the other checkpoints' columns would go unread."""
    if not (student.aw_dir / "sfs_tfs.json").exists():
        ex.timer.run(f"weights s{student.seed}", weights.main, [
            "--teacher", str(ex.teacher_run), "--student-sft", str(student.model), "--out", str(student.aw_dir),
            "--steps", "best,final",
            *ex.task_flags, "--preset", "cpu" if ex.args.quick else ex.args.preset,
            "--train-size", str(ex.sizes["train_size"]), "--max-len", str(ex.sizes["max_len"]),
            "--dtype", ex.args.dtype, "--device", str(ex.device)])


def row_checkpoint(ex: Experiment, out: Path) -> Path:
    """The checkpoint of a distillation that its report row scores: best/ under the paper's protocol, else final/."""
    return out / ("best" if ex.args.protocol == "paper" else "final")


def run_distill(ex: Experiment, student: Student, variant: str, out: Path, name: str, *extra: str,
                split: str = "test", size: int | None = None) -> tuple[dict, dict]:
    """One distill.py run (skipped when complete, resumed when interrupted); the eval metrics of its row's checkpoint
    (row_checkpoint) and of its final one. `size`: the examples of `split` it scores (default the test size)."""
    args = ex.args
    size = ex.test_size if size is None else size
    evals = [d / f"eval_{args.task}_{split}.json" for d in (row_checkpoint(ex, out), out / "final")]
    flags = run_flags(out, all(e.exists() for e in evals), checkpoints.latest_resumable(out / "resume") is not None)
    if flags is not None:
        ex.timer.run(name, distill.main, [
            *distill_flags(variant, args, ex.root, student.aw_dir, student.model), "--teacher", str(ex.teacher_run),
            "--init", str(student.model if variant.endswith("_from_sft") else ex.models / "student"),
            "--variant", variant, "--out", str(out), "--eval-split", split, "--eval-size", str(size),
            *ex.stop_flags, *(cache_flags(ex) if "--on-policy" not in VARIANTS[variant][1] else []),
            *(without(student.flags, "--epochs") if "--stage-epochs" in ex.protocol["distill"] else student.flags),
            *ex.protocol["distill"], *(ex.quick_eval if "--val-metric" in ex.protocol["distill"] else []),
            *(QUICK_DISTILL if args.quick else []), *extra, *flags])
    prune_run(out, args.keep_stages)
    return read_json(evals[0]), read_json(evals[1])


def search_lr(ex: Experiment, student: Student):
    """The paper's learning-rate search: on TD, by validation score, shared by all methods (and on TD from the SFT
    student for the variants that start there); a grid of one rate is used as given. Written to lr_search.json."""
    args = ex.args
    for start, grid in (("base", args.lr_grid), ("sft", args.sft_lr_grid)):
        if grid and (start == "base" or any(v.endswith("_from_sft") for v in args.variants)):
            td = "td" if start == "base" else "td_from_sft"
            if len(grid) == 1:  # nothing to choose between: the rate as given, no validation run
                ex.lr_search[start] = {"variant": td, "chosen": grid[0], "given": True}
                continue
            scores = {lr: run_distill(ex, student, td, ex.root / f"lr_{td}_{lr}", f"lr search {td} {lr}", "--lr", lr,
                                      split="val", size=ex.preset["grid_val"])[0]["main"] for lr in grid}
            ex.lr_search[start] = {"variant": td, "split": "val", "n": ex.preset["grid_val"], "scores": scores,
                                   "chosen": max(grid, key=lambda lr: (scores[lr], -grid.index(lr)))}
    atomic_write_text(ex.root / "lr_search.json", json.dumps(ex.lr_search, indent=2) + "\n")


def distill_variants(ex: Experiment, student: Student):
    """Every variant distilled on one seed, at its start's learning rate, and its test score."""
    args, seed = ex.args, student.seed
    first = seed == ex.seeds[0]  # the seed the report analyses
    for variant in args.variants:
        start = "sft" if variant.endswith("_from_sft") else "base"
        lr = ["--lr", ex.lr_search[start]["chosen"]] if start in ex.lr_search else []
        sides_flag = ["--sides", str(student.aw_dir / "sfs_tfs.json")] if args.stage_sides and first else []
        out = ex.root / f"{variant}_s{seed}"
        row, final = run_distill(ex, student, variant, out, f"distill {variant} s{seed}", *lr, *sides_flag)
        ex.results["main"][variant].append(row["main"])
        ex.eval_files[variant].append(row_checkpoint(ex, out) / f"eval_{args.task}_test.json")
        if args.protocol == "paper":  # the best stage is the row, the final one is reported beside it
            ex.results["main_final"].setdefault(variant, []).append(final["main"])


def sides_analysis(ex: Experiment, student: Student):
    """The paper's theory, measured on one seed: every model's loss on the SFS and on the TFS training examples,
    kept in sides.json model by model."""
    args = ex.args
    ex.split = weights.final_split(read_json(student.aw_dir / "sfs_tfs.json"))
    sides_path = ex.root / "sides.json"
    ex.sides = read_json(sides_path) if sides_path.exists() else {}
    tok = data.load_tokenizer(ex.models / "student")
    items = None
    dirs = {"teacher": ex.teacher_final, "student_base": ex.models / "student", "student_sft": student.model,
            **{v: row_checkpoint(ex, ex.root / f"{v}_s{student.seed}") for v in args.variants}}
    for key, model_dir in dirs.items():
        if key in ex.sides:
            continue
        if items is None:
            sft_args = argparse.Namespace(task=args.task, data=args.data, data_dir=args.data_dir,
                                          metric=args.metric, max_len=ex.sizes["max_len"], refuse_long=False)
            _, train_items = train.load_split(tok, sft_args, "train", ex.sizes["train_size"])
            items = {it["id"]: it for it in train_items}
        ex.sides[key] = side_losses(model_dir, ex.split, items, tok.pad_id, ex.device, args.dtype)
        atomic_write_text(sides_path, json.dumps(ex.sides, indent=2) + "\n")


def write_results(ex: Experiment):
    """The paired comparisons, the granularity curve and the schedule plot; then results.md, printed, and
    results.json (report.py)."""
    args, root = ex.args, ex.root
    ex.results["decode"] = args.decode
    ex.results.update(report.compare(root, args.task, args.kind, ex.seeds, ex.eval_files, args.variants))
    ex.results["lr_search"] = ex.lr_search
    ex.results["granularity"] = report.granularity(root, args.variants, ex.results["main"])
    note = report.plot_schedule(root, ex.seeds[0], args.variants, root / "schedule.png")
    report.write_report(root, args, ex.seeds, ex.results, ex.timer.times, ex.sides, ex.split, note, ex.command)
    print((root / "results.md").read_text())


def main(argv=None):
    runtime.single_process("experiment.py")
    args = parse_flags(argv)
    with runtime.only_one_in(root_dir(args), "experiment.py"):  # a second one would overwrite this one's live runs
        run(setup(args, argv))


def run(ex: Experiment):
    """The stages: heal, the teacher, then per seed the student SFT, the AW table and the variants; the report."""
    if ex.args.teacher_only:  # beside heal.py: the stages that need no student
        record_settings(ex)
    else:
        heal_and_check(ex)
    teacher_sft(ex)
    if ex.args.spacings:
        other_spacings(ex)
    if ex.args.teacher_only:
        cache_flags(ex)
        print(f"the teacher's stages are done in {ex.root}; run the same command without --teacher-only once the "
              "student is healed")
        return
    for seed in ex.seeds:
        student = student_sft(ex, seed)
        aw_table(ex, student)
        if seed == ex.seeds[0]:  # one learning rate per start, for every seed
            search_lr(ex, student)
        distill_variants(ex, student)
        if seed == ex.seeds[0]:  # the report analyses the first seed
            sides_analysis(ex, student)
    write_results(ex)


if __name__ == "__main__":
    run_cli(main)
