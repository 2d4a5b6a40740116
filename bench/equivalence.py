"""Proves that the working tree (uncommitted changes included) behaves exactly as commit --ref: both run one tiny CPU
pipeline (SFT, weights.py, SCD+AW online, cached and on 2 torchrun ranks, TD, heal.py, evaluate.py) from the same tiny
random models, and every logged number, schedule, prediction, checkpoint index and weight tensor must be bit-for-bit
equal (wall-clock fields aside); exit 0 only then. About 70 s on 2 cores:

    OMP_NUM_THREADS=1 .venv/bin/python bench/equivalence.py --ignore 'heal/metrics.jsonl:ce'   # since heal's CE fix
    OMP_NUM_THREADS=1 .venv/bin/python bench/equivalence.py [--ref 04c789a] [--keep] [--allow-new 'td/new.json']
"""

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent  # the tree under test: this script's own checkout, as it is on disk
DATA = (ROOT / ".." / "shared" / "data").resolve()
SKIP = ("trainer_state.*", "rng_*")  # resume machinery, not behaviour; dcp/ dirs are skipped too
JSON_NAMES = ("checkpoints.json", "eval_*.json", "sfs_tfs.json", "heal.json", "manifest.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="04c789a", help="git revision to compare the working tree against (default: "
                                                     "04c789a, main before the restructuring)")
    p.add_argument("--work", default=None, help="empty or new dir for the models and both trees' runs "
                                                 "(default: a temp dir, deleted at the end unless --keep)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="every script's --dtype: bf16 runs the autocast paths (on a CPU with bf16 matmuls)")
    p.add_argument("--keep", action="store_true", help="keep the ref worktree and the default --work dir")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB:KEY",
                   help="a logged field whose value changed on purpose since --ref, left out of the comparison in "
                        "the files matching GLOB (e.g. 'heal/metrics.jsonl:ce': heal.py's logged CE no longer counts "
                        "the unlabelled last position of each row); repeatable (default: none)")
    p.add_argument("--allow-new", action="append", default=[], metavar="GLOB",
                   help="a file (path relative to the runs dir, fnmatch) that may exist only in the working tree's "
                        "runs; repeatable (default: none)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# running both trees


def build_models(models: Path):
    """Tiny random models from the current tree's prepare.build_tiny with the real tokenizer, used by both trees."""
    tokenizer = ROOT / "models" / "teacher"
    if not (tokenizer / "tokenizer.json").is_file():
        run_or_exit("prepare", [sys.executable, "prepare.py"], ROOT)
    sys.path.insert(0, str(ROOT))
    import prepare
    # 3 layers, so heal.py --layers 2 really prunes one
    prepare.build_tiny(models / "teacher", tokenizer, n_layers=3, dim=64, seed=1)
    prepare.build_tiny(models / "student", tokenizer, n_layers=1, dim=64, seed=2)


def plan(out: Path, models: Path, dtype: str = "fp32") -> list[tuple[str, list]]:
    """(name, argv) of each command, run in this order with cwd = the tree; every output goes under `out`."""
    cpu = ["--data-dir", DATA, "--device", "cpu", "--dtype", dtype]
    train = ["--train-size", 16, "--val-size", 4, "--max-len", 128, "--epochs", 2, "--lr", "3e-3", "--log-every", 1,
             "--eval-max-new-tokens", 8, *cpu]
    tiny_t, tiny_s = models / "teacher", models / "student"
    teacher, student, aw, cache = out / "teacher", out / "student", out / "aw", out / "teacher_cache"
    distill = ["distill.py", "--teacher", teacher, "--init", tiny_s, "--stages", 2, "--max-new-tokens", 8,
               "--eval-size", 8, *train]
    scd_aw = [*distill, "--schedule", "scd", "--aw", "--student-sft", student, "--aw-table", aw / "losses.safetensors",
              "--probe-size", 8]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2]
    return [
        ("sft teacher", ["sft.py", "--role", "teacher", "--model", tiny_t, "--out", teacher, "--batch-size", 4,
                         "--save-every", 2, *train]),
        ("sft student", ["sft.py", "--role", "student", "--model", tiny_s, "--out", student, "--batch-size", 4,
                         *train]),
        ("weights", ["weights.py", "--teacher", teacher, "--student-sft", student, "--out", aw, "--train-size", 16,
                     "--max-len", 128, "--batch-size", 4, *cpu]),
        ("distill scd+aw", [*scd_aw, "--probe-cache", out / "probe_cache", "--batch-size", 4, "--out",
                            out / "scd_aw"]),
        ("teacher_cache", ["teacher_cache.py", "--teacher", teacher, "--out", cache, "--form", "exact",
                           "--precision", "fp32", "--probe-size", 8, "--tokenizer", tiny_s, "--train-size", 16,
                           "--max-len", 128, "--batch-size", 4, *cpu]),
        ("distill scd+aw cached", [*scd_aw, "--teacher-cache", cache, "--batch-size", 4, "--out",
                                   out / "scd_aw_cached"]),
        ("distill td alpha 0.3", [*distill, "--schedule", "td", "--no-aw", "--alpha", 0.3, "--batch-size", 4,
                                  "--out", out / "td"]),
        ("distill scd+aw 2 ranks", [*torchrun, *scd_aw, "--probe-cache", out / "probe_cache_2ranks",
                                    "--batch-size", 2, "--out", out / "scd_aw_2ranks"]),
        ("heal", ["heal.py", "--teacher", tiny_t, "--layers", 2, "--tokens", 2000, "--seq-len", 64, "--batch-size", 2,
                  "--calib-rows", 4, "--eval-tokens", 512, "--evals", 2, "--log-every", 1, "--export", out / "healed",
                  "--out", out / "heal", *cpu]),
        ("evaluate", ["evaluate.py", "--model", out / "scd_aw" / "final", "--task", "ncbi_disease", "--split", "test",
                      "--limit", 8, "--max-new-tokens", 8, "--out", out / "eval" / "eval_ncbi_disease_test.json",
                      *cpu]),
    ]


def run_or_exit(name: str, argv: list, cwd: Path):
    """Run one command with one thread per process; on failure print its stderr's tail and exit 1."""
    argv = [str(a) for a in argv]
    if argv[0].endswith(".py"):
        argv = [sys.executable, *argv]
    r = subprocess.run(argv, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAILED ({r.returncode}) in {cwd}: {name}\n  {' '.join(argv)}\n{r.stderr[-3000:]}", flush=True)
        sys.exit(1)


def run_tree(label: str, tree: Path, out: Path, models: Path, dtype: str):
    for name, argv in plan(out, models, dtype):
        t0 = time.time()
        run_or_exit(name, argv, tree)
        print(f"  {label}: {name} ({time.time() - t0:.1f}s)", flush=True)


# -----------------------------------------------------------------------------
# comparing the outputs


def artifacts(out: Path) -> dict[str, Path]:
    """The compared files under `out`, by path relative to it."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or "dcp" in rel.parts or any(fnmatch.fnmatch(path.name, g) for g in SKIP):
            continue
        if path.suffix in (".jsonl", ".safetensors") or any(fnmatch.fnmatch(path.name, g) for g in JSON_NAMES):
            found[key_free(rel.as_posix())] = path
    return found


def is_wall_clock(key: str) -> bool:
    return key == "tok_per_s" or "time" in key or "seconds" in key


def normalise(value, out: Path, tree: Path):
    """Paths into a tree's own runs or checkout read the same for both trees."""
    if isinstance(value, str):
        return value.replace(str(out), "<RUNS>").replace(str(tree), "<TREE>")
    if isinstance(value, list):
        return [normalise(v, out, tree) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v, out, tree) for k, v in value.items()}
    return value


def mask_mtime_fingerprints(name: str, value: dict) -> dict:
    """Cache keys are fingerprints of what the values depend on: the reference's teacher cache keyed its checkpoints
    by the files' size, mtime and header hash (different between any two runs), and the restructure gave examples and
    models one fingerprint recipe each (checkpoints.py), which changed the keys' values, the cache's version and the
    probe cache's dir name. Compare which keys exist and the values they key, not the fingerprints themselves."""
    if name == "manifest.json" and "checkpoints" in value.get("key", {}):
        value["key"]["checkpoints"] = {step: "<fingerprint>" for step in value["key"]["checkpoints"]}
        value["key"]["data"] = "<fingerprint>"
        value["version"] = "<version>"
    if name.endswith(".safetensors") and "checkpoint" in value:
        value["checkpoint"] = "<fingerprint>"
    return value


def key_free(rel: str) -> str:
    """A relative path with the probe cache's content-key dir name masked (see mask_mtime_fingerprints)."""
    return re.sub(r"probe-[0-9a-f]{16}", "probe-<key>", rel)


def first_difference(a, b, where: str = "") -> str | None:
    """None if a and b are equal (floats by ==, types too), else where and how they first differ."""
    if type(a) is not type(b):
        return f"{where or 'value'}: {a!r} ({type(a).__name__}) != {b!r} ({type(b).__name__})"
    if isinstance(a, dict):
        ka, kb = {k for k in a if not is_wall_clock(k)}, {k for k in b if not is_wall_clock(k)}
        if ka != kb:
            return f"{where or 'keys'}: only in ref {sorted(ka - kb)}, only in new {sorted(kb - ka)}"
        for k in sorted(ka):
            diff = first_difference(a[k], b[k], f"{where}.{k}" if where else k)
            if diff:
                return diff
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or 'list'}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{where}[{i}]")
            if diff:
                return diff
        return None
    if a == b or (isinstance(a, float) and a != a and b != b):  # two NaNs are the same number
        return None
    return f"{where or 'value'}: {a!r} != {b!r}"


def read_json_rows(path: Path, side: tuple[Path, Path]) -> list:
    """A .jsonl file as its list of rows, a .json file as a one-row list; paths normalised."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return normalise([json.loads(s) for s in text.splitlines() if s.strip()], *side)
    return [normalise(mask_mtime_fingerprints(path.name, json.loads(text)), *side)]


def compare_json(a: Path, b: Path, side_a, side_b, ignored: set[str] = frozenset()) -> str | None:
    ra, rb = read_json_rows(a, side_a), read_json_rows(b, side_b)
    ra, rb = ([{k: v for k, v in r.items() if k not in ignored} if isinstance(r, dict) else r for r in rows]
              for rows in (ra, rb))
    if len(ra) != len(rb):
        return f"{len(ra)} rows != {len(rb)} rows"
    for i, (x, y) in enumerate(zip(ra, rb)):
        diff = first_difference(x, y)
        if diff:
            return f"row {i + 1}: {diff}"
    return None


def compare_safetensors(a: Path, b: Path, side_a, side_b) -> str | None:
    ta, tb = load_file(str(a)), load_file(str(b))
    if sorted(ta) != sorted(tb):
        return f"tensor names: only in ref {sorted(set(ta) - set(tb))[:5]}, only in new {sorted(set(tb) - set(ta))[:5]}"
    for name in sorted(ta):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype} {tuple(x.shape)} != {y.dtype} {tuple(y.shape)}"
        if not torch.equal(x, y):
            return f"{name}: max |diff| {(x.double() - y.double()).abs().max().item():.3g}"
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ma = normalise(mask_mtime_fingerprints(a.name, fa.metadata() or {}), *side_a)
        mb = normalise(mask_mtime_fingerprints(b.name, fb.metadata() or {}), *side_b)
    return first_difference(ma, mb, "metadata")


def compare(ref_out: Path, ref_tree: Path, new_out: Path, allow_new: list[str], ignore=()) -> tuple[int, int]:
    """Print one line per artifact; (number equal, number differing)."""
    ref, new = artifacts(ref_out), artifacts(new_out)
    side_ref, side_new = (ref_out, ref_tree), (new_out, ROOT)
    n_equal = n_diff = 0
    for rel in sorted(set(ref) | set(new)):
        if rel not in new:
            diff = "missing in the working tree's runs"
        elif rel not in ref:
            if any(fnmatch.fnmatch(rel, g) for g in allow_new):
                print(f"{rel}  new only, allowed by --allow-new")
                continue
            diff = "only in the working tree's runs"
        elif rel.endswith(".safetensors"):
            diff = compare_safetensors(ref[rel], new[rel], side_ref, side_new)
        else:
            ignored = {key for glob, key in (g.rsplit(":", 1) for g in ignore) if fnmatch.fnmatch(rel, glob)}
            diff = compare_json(ref[rel], new[rel], side_ref, side_new, ignored)
        if diff:
            n_diff += 1
            print(f"{rel}  DIFFERS: {diff}")
        else:
            n_equal += 1
            print(f"{rel}  equal")
    return n_equal, n_diff


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: no task data (this repository's ../shared/data)")
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="equivalence-"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work {work}: not empty; give an empty or new dir")
    work.mkdir(parents=True, exist_ok=True)
    ref_tree = Path(tempfile.mkdtemp(prefix="equivalence-ref-")) / "tree"
    try:
        run_or_exit("git worktree add", ["git", "worktree", "add", "--detach", "-q", ref_tree, args.ref], ROOT)
        ref_rev = subprocess.run(["git", "-C", str(ref_tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        print(f"ref {args.ref} ({ref_rev}) in {ref_tree}\nnew: working tree {ROOT}\nruns in {work}", flush=True)
        build_models(work / "models")
        run_tree("ref", ref_tree, work / "ref", work / "models", args.dtype)
        run_tree("new", ROOT, work / "new", work / "models", args.dtype)
        n_equal, n_diff = compare(work / "ref", ref_tree, work / "new", args.allow_new, args.ignore)
    finally:
        if not args.keep:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)],
                           capture_output=True)
            shutil.rmtree(ref_tree.parent, ignore_errors=True)
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    verdict = "EQUIVALENT" if n_diff == 0 else "NOT EQUIVALENT"
    print(f"{verdict}: {n_equal} artifacts equal, {n_diff} differ (ref {args.ref}, {time.time() - t0:.0f}s)")
    return 0 if n_diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
