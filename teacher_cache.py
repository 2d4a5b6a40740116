"""The teacher checkpoints' log-probabilities at every answer position of the training split, computed once
(SCD's candidate checkpoints are fixed before distillation starts, arXiv 2601.10114 Sec. 3.2), so distill.py's KD
term, AW's L_ckpt and SCD's probe read them and no teacher model is loaded during distillation.

    python teacher_cache.py --teacher runs/teacher --out runs/teacher_cache             # exact, fp16 on disk
    python teacher_cache.py --teacher runs/teacher --out runs/teacher_cache --form topk --top-k 64
    python distill.py --teacher-cache runs/teacher_cache

One safetensors shard per checkpoint, OUT/step_XXXXXX.safetensors, holding for each training example (key
"<kind>/<example id>", rows = its answer positions in order):

    exact   logp/<id>     (n, V)  every log-prob, --precision on disk (fp16 by default)
    topk    values/<id>   (n, k)  the k largest log-probs, --precision
            indices/<id>  (n, k)  their token ids, int32
            tail/<id>     (n,)    log of the mass outside them, log(1 − Σ_k p), fp32
            probe/<id>    (n, V)  all log-probs, for the examples of SCD's probe sets (--probe-size, --seeds) only
    both    gold/<id>     (n,)    log p(gold token), fp32: AW's L_ckpt is exact in either form

All log-probs are at temperature 1; distill.py re-tempers them. OUT/manifest.json holds the form and the key the
values depend on (cache_key): the training items' ids and tokens, max length, forward dtype and device kind, and
each checkpoint's content (checkpoints.model_fingerprint). A run whose key differs is refused with the part that
differs; a rebuild redoes only the checkpoints whose files changed.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

import data
import runtime
import schedule
from checkpoints import checkpoint_name, checkpoint_steps, items_fingerprint, list_checkpoints, model_fingerprint
from flags import add_scoring_args, resolve_scoring_args
from losses import TopK, tail_log_mass
from model import load_model
from runtime import UserError, atomic_write_text, read_json, run_cli, save_tensors
from train import answer_batches, load_split

FORMS = ("exact", "topk")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
VERSION = 2  # of the manifest's key: a cache keyed another way is refused by name and rebuilt
DEFAULT_K = 64  # the mean KD term stays close to exact at k = 64 (bench/topk_error.py)

# -----------------------------------------------------------------------------
# the key: everything a cached value depends on


def cache_key(items: list[dict], checkpoints: dict[int, Path], max_len: int, dtype: str, device_kind: str) -> dict:
    """What the teacher's answer-position log-probs depend on, part by part, so a mismatch can be named."""
    return {"data": items_fingerprint(items), "n_items": len(items), "max_len": max_len, "dtype": dtype,
            "device": device_kind, "checkpoints": {str(s): model_fingerprint(p) for s, p in checkpoints.items()}}


def answer_counts(items: list[dict]) -> list[int]:
    return [sum(1 for y in it["labels"][1:] if y != data.IGNORE) for it in items]


def storage_bytes(n_tokens: int, n_probe_tokens: int, vocab_size: int, form: str, k: int, precision: str) -> int:
    """Bytes of one checkpoint's shard, tensor data only (the header adds a few hundred bytes per example)."""
    b = PRECISIONS[precision].itemsize
    if form == "exact":
        return n_tokens * (vocab_size * b + 4)
    return n_tokens * (k * (b + 4) + 4 + 4) + n_probe_tokens * vocab_size * b

# -----------------------------------------------------------------------------
# building


def top_k(logp: torch.Tensor, k: int, precision: str = "fp16"):
    """fp32 log-probs (N, V) -> the k largest, rounded to `precision` (N, k), their token ids (N, k) int32, and the
    log of the remaining mass (N,) fp32, summed from the other tokens' own log-probs (1 − Σ top-k would cancel)."""
    values, indices = logp.topk(min(k, logp.shape[-1]), -1)
    return values.to(PRECISIONS[precision]), indices.int(), tail_log_mass(logp, indices)


def checkpoint_tensors(model, items: list[dict], pad_id: int, form: str, k: int, precision: str, probe_ids: set,
                       batch_size: int, device, dtype: str) -> dict[str, torch.Tensor]:
    """One checkpoint's shard contents: its fp32 log-softmax at each item's answer positions, kept whole or as
    top-k + tail, plus the gold token's log-prob."""
    store = PRECISIONS[precision]
    out = {}
    for idx, logits, labels, rows in answer_batches(model, items, pad_id, batch_size, device, dtype, by_length=True):
        chunk = [items[j] for j in idx]
        logp = torch.log_softmax(logits.float(), -1)
        gold = logp.gather(-1, labels[:, None])[:, 0]
        if form == "topk":
            values, indices, tail = top_k(logp, k, precision)  # (N, k), (N, k), (N,)
        n = torch.bincount(rows, minlength=len(chunk)).tolist()
        for it, sl in zip(chunk, torch.arange(len(rows), device=rows.device).split(n)):
            key = it["id"]
            out[f"gold/{key}"] = gold[sl].cpu()
            if form == "exact":
                out[f"logp/{key}"] = logp[sl].to(store).cpu()
            else:
                out[f"values/{key}"] = values[sl].cpu()
                out[f"indices/{key}"] = indices[sl].cpu()
                out[f"tail/{key}"] = tail[sl].cpu()
                if key in probe_ids:
                    out[f"probe/{key}"] = logp[sl].to(store).cpu()
    return out


def build(out, teacher_dir, items: list[dict], pad_id: int, max_len: int, form: str = "topk", k: int = 64,
          precision: str = "fp16", probe_ids=(), batch_size: int = 16, device=torch.device("cpu"),
          dtype: str = "fp32", steps=None) -> Path:
    """Write (or complete) the cache of every checkpoint in teacher_dir (or `steps` of them), one model in memory at a
    time. Shards made for these items, settings and checkpoint files are kept; everything else is redone."""
    out = Path(out)
    checkpoints = dict(list_checkpoints(teacher_dir))
    if steps is not None:
        checkpoints = {s: checkpoints[s] for s in steps}
    if not checkpoints:
        raise UserError(f"{teacher_dir}: no complete checkpoints (step_XXXXXX/ with meta.json); run sft.py first")
    key = cache_key(items, checkpoints, max_len, dtype, device.type)
    settings = {"form": form, "k": k if form == "topk" else None, "precision": precision,
                "probe_ids": sorted(probe_ids) if form == "topk" else []}
    old = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else None
    if old is not None and (old.get("version") != VERSION or old.get("settings") != settings
                            or {k_: v for k_, v in old["key"].items() if k_ != "checkpoints"}
                            != {k_: v for k_, v in key.items() if k_ != "checkpoints"}):
        print(f"{out}: built for other data or settings; rebuilding it")
        shutil.rmtree(out)
        old = None
    done = old["key"]["checkpoints"] if old is not None else {}
    todo = [s for s in checkpoints
            if done.get(str(s)) != key["checkpoints"][str(s)] or not shard_path(out, s).is_file()]
    vocab = read_json(checkpoints[min(checkpoints)] / "config.json")["vocab_size"]
    counts = answer_counts(items)
    n_tok, n_probe = sum(counts), sum(c for it, c in zip(items, counts) if it["id"] in settings["probe_ids"])
    per = storage_bytes(n_tok, n_probe, vocab, form, k, precision)
    print(f"teacher cache {out}: {form}{f' k={k}' if form == 'topk' else ''} {precision}, {len(items)} examples, "
          f"{n_tok} answer tokens ({n_probe} in probe sets), vocab {vocab}: {per / 2**20:.1f} MiB per checkpoint; "
          f"writing {len(todo)} of {len(checkpoints)} checkpoints, {len(todo) * per / 2**20:.1f} MiB")
    manifest = {"version": VERSION, "settings": settings, "vocab_size": vocab, "key": {**key, "checkpoints": {}},
                "teacher": str(teacher_dir)}
    manifest["key"]["checkpoints"] = {s: v for s, v in done.items() if int(s) in checkpoints and int(s) not in todo}
    for step in tqdm(todo, desc="teacher cache", disable=not todo):
        model = load_model(checkpoints[step], device=device).requires_grad_(False)
        tensors = checkpoint_tensors(model, items, pad_id, form, k, precision, set(settings["probe_ids"]),
                                     batch_size, device, dtype)
        del model
        save_tensors(shard_path(out, step), tensors, {"step": str(step), "checkpoint": key["checkpoints"][str(step)]})
        manifest["key"]["checkpoints"][str(step)] = key["checkpoints"][str(step)]  # listed once its shard is whole
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


def shard_path(root: Path, step: int) -> Path:
    return Path(root) / f"{checkpoint_name(step)}.safetensors"

# -----------------------------------------------------------------------------
# reading


class TeacherCache:
    """A cache dir written by build(): checks it against a run and opens one checkpoint's shard at a time."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise UserError(f"--teacher-cache {self.root}: no {MANIFEST}; build it with python teacher_cache.py "
                            f"--out {self.root}")
        self.manifest = read_json(self.root / MANIFEST)
        if self.manifest.get("version") != VERSION:
            raise UserError(f"--teacher-cache {self.root}: written by another version of teacher_cache.py; rebuild it")
        self.form = self.manifest["settings"]["form"]

    def describe(self) -> str:
        s = self.manifest["settings"]
        return f"{s['form']}{' k=%d' % s['k'] if s['form'] == 'topk' else ''} {s['precision']}"

    def check(self, key: dict, probe: list[dict] = ()):
        """Refuse, naming what differs, a cache not made for this run's items, max length, forward dtype, device
        kind or teacher checkpoints (key from cache_key), or one without exact rows for SCD's `probe` items."""
        have = self.manifest["key"]
        fix = f"rebuild it with python teacher_cache.py --out {self.root} and this run's flags"
        for part, what in (("max_len", "--max-len"), ("data", "training items (ids and tokens)"),
                           ("dtype", "--dtype"), ("device", "device kind")):
            if have[part] != key[part]:
                shown = (f"{have['n_items']} items, fingerprint {have['data']}; this run has {key['n_items']}, "
                         f"{key['data']}") if part == "data" else f"{have[part]}; this run has {key[part]}"
                raise UserError(f"--teacher-cache {self.root}: built for other {what} ({shown}); {fix}")
        for step, fp in key["checkpoints"].items():
            if step not in have["checkpoints"]:
                raise UserError(f"--teacher-cache {self.root}: has no values for teacher checkpoint {step}; {fix}")
            if have["checkpoints"][step] != fp:
                raise UserError(f"--teacher-cache {self.root}: teacher checkpoint {step} changed since the cache "
                                f"was built; {fix}")
        if self.form == "topk":
            stored = set(self.manifest["settings"]["probe_ids"])
            missing = [it["id"] for it in probe if it["id"] not in stored]
            if missing:
                raise UserError(f"--teacher-cache {self.root}: top-k cache without the full log-probs of probe "
                                f"example {missing[0]}; rebuild it with the run's --probe-size and --seed in "
                                "--probe-size/--seeds")

    def get(self, step: int) -> "CachedTeacher":
        """The teacher of checkpoint `step`, as distill.py asks its teacher source for it."""
        return CachedTeacher(shard_path(self.root, step), self.form, self.manifest["vocab_size"])

    def probe(self, items: list[dict]) -> "CachedProbe":
        """SCD's probe log-probs, as schedule.ProbeCache gives them."""
        return CachedProbe(self, items)


class CachedTeacher:
    """One checkpoint's shard, memory-mapped; serves distill_step in place of the teacher model
    (teachers.ModelTeacher) with the same interface."""

    def __init__(self, path: Path, form: str, vocab_size: int):
        from safetensors import SafetensorError, safe_open
        try:
            self.file = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read the teacher cache shard ({e})") from None
        self.path, self.form, self.vocab_size = path, form, vocab_size

    def get(self, kind: str, ids: list[str], device) -> torch.Tensor:
        return torch.cat([self.file.get_tensor(f"{kind}/{i}") for i in ids]).to(device)

    def targets(self, batch: dict):
        """The teacher at the batch's N answer positions, in train.answer_positions order: (N, V) fp32 log-probs or a
        TopK, and (N,) the CE of its gold tokens, −log p(gold)."""
        device = batch["input_ids"].device
        gold = self.get("gold", batch["ids"], device)
        n = int((batch["labels"][:, 1:] != data.IGNORE).sum())
        if gold.shape[0] != n:
            raise UserError(f"{self.path}: {gold.shape[0]} answer positions cached for this batch, it has {n}; "
                            "the cache is stale, rebuild it")
        if self.form == "exact":
            return self.get("logp", batch["ids"], device).float(), -gold
        return TopK(self.get("values", batch["ids"], device).float(), self.get("indices", batch["ids"], device).long(),
                    self.get("tail", batch["ids"], device), self.vocab_size), -gold

    def idle(self, batch: dict):
        """Nothing to run for a rank's empty share of a batch: the cache has no collectives."""


class CachedProbe:
    """load(step) -> fp32 log-probs (N, V) of the probe items' answer positions, in order (schedule.Scheduler)."""

    def __init__(self, cache: TeacherCache, items: list[dict]):
        self.cache, self.ids = cache, [it["id"] for it in items]

    def load(self, step: int) -> torch.Tensor:
        kind = "logp" if self.cache.form == "exact" else "probe"
        return self.cache.get(step).get(kind, self.ids, "cpu").float()

# -----------------------------------------------------------------------------


def main(argv=None):
    runtime.single_process("teacher_cache.py")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="teacher SFT run dir holding step_XXXXXX checkpoints")
    p.add_argument("--out", default="runs/teacher_cache", help="cache dir (distill.py --teacher-cache)")
    p.add_argument("--steps", default="all",
                   help="teacher checkpoints to cache: 'all' (SCD, CD), 'best' or 'final' (TD), or steps 'S1,S2'")
    p.add_argument("--form", choices=FORMS, default="exact",
                   help="exact: all V log-probs per answer position; topk: the k largest + the tail's log-mass")
    p.add_argument("--top-k", type=int, default=DEFAULT_K, help="k of --form topk")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp16",
                   help="on-disk dtype of the log-probs (gold log-probs and tail masses are always fp32)")
    p.add_argument("--probe-size", type=int, default=schedule.PROBE_SIZE,
                   help="distill.py's --probe-size: a top-k cache keeps the full log-probs of these probe examples "
                        "for SCD")
    p.add_argument("--seeds", default="0", help="comma-separated --seed values of the distill runs (their probe sets)")
    p.add_argument("--tokenizer", default=None, help="model dir whose tokenizer encodes the data, as distill.py's "
                                                     "--init (default: the first teacher checkpoint)")
    add_scoring_args(p)
    args = p.parse_args(argv)
    device = resolve_scoring_args(args, runtime.given_flags(p, argv))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if args.top_k < 1 or args.probe_size < 1:
        raise UserError("--top-k and --probe-size must be positive")
    checkpoints = list_checkpoints(args.teacher)
    if not checkpoints:
        raise UserError(f"{args.teacher}: no complete checkpoints (step_XXXXXX/ with meta.json); run sft.py first")
    steps = None if args.steps == "all" else checkpoint_steps(args.teacher, args.steps)
    tok_dir = Path(args.tokenizer or checkpoints[0][1])
    data.check_same_vocab({f"--tokenizer {tok_dir}": tok_dir,
                               **{f"--teacher {p_}": p_ for _, p_ in checkpoints}})
    tok = data.load_tokenizer(tok_dir)
    _, items = load_split(tok, args, "train", args.train_size)
    if not items:
        raise UserError(f"task {args.task}: the training split is empty")
    probe_ids = {it["id"] for s in seeds for it in schedule.probe_items(items, args.probe_size, s)}
    out = build(args.out, args.teacher, items, tok.pad_id, args.max_len, args.form, args.top_k, args.precision,
                probe_ids, args.batch_size, device, args.dtype, steps)
    atomic_write_text(out / "config.json", json.dumps({**vars(args), "device": str(device)}, indent=2) + "\n")
    print(f"done: {out}")


if __name__ == "__main__":
    run_cli(main)
