"""Supervised fine-tuning of the teacher and the student (SCD paper, Sec. 3.1, steps 1 and 2).

The teacher's periodic checkpoints are the "footsteps" that SCD later walks the student along; the student's final
checkpoint is the frozen SFT reference that AW compares against. Both roles run the same loop:

    python sft.py --role teacher        # models/teacher -> runs/teacher/step_XXXXXX/ ...
    python sft.py --role student        # models/student -> runs/student/step_XXXXXX/ ...

Where the teacher's footsteps are is --spacing (not a choice the paper discusses): even (the paper, and the
default), geometric (dense early, where the teacher moves most) or val_loss (at equal shares of the validation
loss's drop); --checkpoints sets how many.

The loss is cross-entropy on answer tokens only, divided by the number of answer tokens in the whole accumulated
batch, so `--grad-accum` does not change the gradient. The LM head runs only at answer positions.

    torchrun --nproc_per_node 8 sft.py --role teacher ...   # data-parallel, FSDP2 (runtime.py)

Under torchrun `--batch-size` is per rank and each global batch is dealt out to the ranks (rank_batch); the loss is
still divided by the answer tokens of the whole global batch, so N ranks train as one process with N times the
batch. Checkpoints stay Hugging Face dirs (written by rank 0); their resume state is sharded by rank.

Also the training plumbing distill.py reuses: optimiser, lr schedule, answer-position logits, atomic checkpoints
with resume state, metrics.jsonl, output-dir checks.
"""

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate
import runtime
from model import MAX_SHARD_BYTES, load_model, save_model
from runtime import (UserError, atomic_write_text, autocast, given_flags, read_json, refuse_unused,
                     resolve_device, resolve_dtype, run_cli, seed_everything)

# role defaults for the CPU-sized default run (NCBI-disease); --preset gpu switches to the paper's sizes.
# The pruned student learns more slowly than the teacher, so it gets a higher lr and more epochs.
ROLE_DEFAULTS = {
    "teacher": dict(model="models/teacher", out="runs/teacher", lr=2e-4, epochs=2, checkpoints=10),
    "student": dict(model="models/student", out="runs/student", lr=5e-4, epochs=3, checkpoints=1),
}
PRESETS = {
    # minutes on 2 CPU cores: a slice of the training split, short sequences
    "cpu": dict(train_size=500, val_size=64, max_len=256, batch_size=8, dtype="auto"),
    # the paper's setting (Sec. 4.1): full splits, max length 512, batch 8, bf16
    "gpu": dict(train_size=0, val_size=0, max_len=512, batch_size=8, dtype="auto", epochs=3),
}
SPACINGS = ("even", "geometric", "val_loss")  # where the teacher's footsteps are (the paper: even)
CHECKPOINT_INDEX = "checkpoints.json"
STATE_FILES = ("trainer_state.safetensors", "trainer_state.json")  # the resume state of one process
DCP_DIR = "dcp"  # the resume state of a torchrun run: model and optimiser, sharded by rank

# -----------------------------------------------------------------------------
# command line shared with distill.py


def add_common_args(p: argparse.ArgumentParser):
    """Flags every training script takes. Defaults of None are filled from the role and the preset."""
    a = p.add_argument
    a("--task", default="ncbi_disease", help="built-in task (ncbi_disease, bc5cdr, pubmedqa) or 'jsonl' with --data")
    a("--data", default=None, help="JSONL file(s) for --task jsonl, comma-separated train[,val[,test]]")
    a("--metric", choices=data.METRICS, default=None,
      help="how --task jsonl is scored when its files do not say: exact, choices or entities (see data.py)")
    a("--data-dir", default=None, help="directory with the built-in tasks' files (default: ../shared/data)")
    a("--out", default=None, help="output run directory")
    a("--preset", choices=sorted(PRESETS), default="cpu", help="sizes: 'cpu' (minutes, default) or 'gpu' (paper)")
    a("--train-size", type=int, default=None,
      help="use N training examples, a fixed seeded subset (0 = all; cpu preset 500)")
    a("--val-size", type=int, default=None, help="validation examples for val loss/metric (0 = all; cpu 64)")
    a("--epochs", type=float, default=None, help="passes over the training data")
    a("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0 = no limit)")
    a("--lr", type=float, default=None, help="peak learning rate")
    a("--warmup", type=float, default=0.1, help="warmup as a fraction of all steps (paper: 0.1)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--batch-size", type=int, default=None,
      help="examples per micro-batch, per rank under torchrun: the global batch is batch x ranks x grad-accum "
           "(paper: 8)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--max-len", type=int, default=None, help="truncate examples to this many tokens (paper: 512)")
    a("--refuse-long", action="store_true", help="stop with an error on an example longer than --max-len "
                                                 "instead of truncating it (truncations are always counted)")
    a("--dtype", choices=["auto", "fp32", "bf16"], default=None,
      help="fp32, or bf16 autocast with fp32 master weights; both presets: auto, which is bf16 where the hardware "
           "has bf16 matmuls (CUDA, AVX-512 or Arm bf16 CPUs) and fp32 elsewhere")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a("--seed", type=int, default=0, help="seed for data order and initialisation")
    a("--log-every", type=int, default=5, help="optimiser steps between metrics.jsonl lines")
    a("--eval-batch-size", type=int, default=16, help="batch size for evaluation and generation")
    a("--eval-max-new-tokens", type=int, default=0, help="generation cap in validation (0 = the task's own)")
    a("--activation-checkpointing", action="store_true",
      help="recompute each decoder layer's activations in backward instead of storing them: less memory, about "
           "one more forward of time (bench/scale.py measures both)")
    a("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 2**30,
      help="checkpoints above this size are written as several model-*-of-*.safetensors files with an index")
    a("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    a("--overwrite", action="store_true", help="delete what --out holds and start over")


def add_scoring_args(p: argparse.ArgumentParser):
    """Flags of the scripts that only score training examples (weights.py, schedule.py). They take the same data
    and sizes as the training runs, so example ids and probe sets match."""
    a = p.add_argument
    a("--task", default="ncbi_disease", help="built-in task or 'jsonl' with --data")
    a("--data", default=None, help="JSONL file(s) for --task jsonl, comma-separated train[,val[,test]]")
    a("--metric", choices=data.METRICS, default=None, help="how --task jsonl is scored when its files do not say")
    a("--data-dir", default=None, help="directory with the built-in tasks' files (default: ../shared/data)")
    a("--preset", choices=sorted(PRESETS), default="cpu",
      help="fills --train-size and --max-len as the training scripts do, so the examples match")
    a("--train-size", type=int, default=None, help="training examples, the same seeded subset (0 = all)")
    a("--max-len", type=int, default=None, help="truncate examples to this many tokens")
    a("--refuse-long", action="store_true", help="stop on an example longer than --max-len instead of truncating")
    a("--batch-size", type=int, default=16, help="examples per forward pass")
    a("--dtype", choices=["auto", "fp32", "bf16"], default="fp32",
      help="fp32, bf16 autocast, or auto (bf16 where the hardware has bf16 matmuls)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def resolve_scoring_args(args) -> torch.device:
    data.check_task_flags(args.task, args.data, args.data_dir, args.metric)
    for key in ("train_size", "max_len"):
        if getattr(args, key) is None:
            setattr(args, key, PRESETS[args.preset][key])
    if args.batch_size <= 0 or args.max_len <= 0 or args.train_size < 0:
        raise UserError("--batch-size and --max-len must be positive, --train-size >= 0")
    device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    return device


def resolve_args(args, role_defaults: dict):
    """Fill None flags from the preset, then the role. Also validates numbers a user can get wrong, and refuses
    data flags the task would ignore."""
    data.check_task_flags(args.task, args.data, args.data_dir, args.metric)
    preset = PRESETS[args.preset]
    for key, value in {**role_defaults, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("batch_size", "grad_accum", "max_len", "log_every", "eval_batch_size"):
        if getattr(args, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    for key in ("epochs", "lr"):
        if getattr(args, key) <= 0:
            raise UserError(f"--{key} must be positive, got {getattr(args, key)}")
    for key in ("max_steps", "train_size", "val_size", "save_every", "seed"):
        if getattr(args, key, 0) < 0:
            raise UserError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if not 0 <= args.warmup < 1:
        raise UserError(f"--warmup is a fraction of the run in [0, 1), got {args.warmup}")
    return args


# -----------------------------------------------------------------------------
# data


def load_split(tok, args, split: str, limit: int = 0):
    """Examples and their encodings for one split; reports how many were truncated to --max-len."""
    files = (args.data or "").split(",") if args.data else []
    data_file = None
    if args.task == "jsonl":
        order = {"train": 0, "val": 1, "test": 2}[split]
        if not files:
            raise UserError("--task jsonl needs --data FILE (train[,val[,test]])")
        if order >= len(files):
            return [], []
        data_file = files[order]
    examples = data.load_examples(args.task, split, data_dir=args.data_dir, data_file=data_file,
                                  limit=limit or None, seed=0,  # the same subset for teacher, student, every seed
                                  metric=getattr(args, "metric", None))
    items, n_trunc = data.encode_split(tok, examples, args.max_len, refuse_long=args.refuse_long)
    if n_trunc:
        runtime.print0(f"{args.task}/{split}: {n_trunc} of {len(examples)} examples truncated to --max-len "
                       f"{args.max_len}")
    return examples, items


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

# -----------------------------------------------------------------------------
# the loss: answer tokens only


def answer_hidden(model, batch):
    """Hidden states at the positions that predict an answer token.

    Returns h (N, D), labels (N,), sample_idx (N,): N answer tokens over the batch; position t predicts token t+1.
    """
    h = model.hidden(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1, D)
    sel, labels, rows = answer_positions(batch["labels"])
    return h[sel], labels, rows


def answer_positions(labels: torch.Tensor):
    """Which of the (B, T-1) positions predict an answer token, and their labels (N,) and batch rows (N,), in
    row-major order: sample by sample, positions in order (the order of every (N, ...) answer-position tensor)."""
    target = labels[:, 1:]  # (B, T-1)
    sel = target != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(target)
    return sel, target[sel], rows[sel]


def answer_logits(model, batch):
    """fp32 logits (N, V) at answer positions only: the (B, T, V) logits of the full sequence are never built."""
    h, labels, rows = answer_hidden(model, batch)
    return model.lm_logits(h), labels, rows


def sft_loss_sum(model, batch):
    """Sum of answer-token CE over the batch (the caller divides by the global answer-token count)."""
    logits, labels, _ = answer_logits(model, batch)
    return F.cross_entropy(logits, labels, reduction="sum")


def n_answer_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(model, items, pad_id, batch_size, device, dtype) -> float:
    """Token-mean answer CE over a list of encoded items."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = to_device(data.collate(items[i:i + batch_size], pad_id), device)
        with autocast(device, dtype):
            total += float(sft_loss_sum(model, batch))
        count += n_answer_tokens(batch)
    return total / max(count, 1)

# -----------------------------------------------------------------------------
# optimiser and schedule (paper: AdamW(0.9, 0.95), clip 1.0, cosine with 10 % warmup)


def make_optimizer(model, lr: float, weight_decay: float = 0.0):
    if runtime.is_sharded(model):  # a forward without backward leaves the FSDP root gathered: the optimiser must
        model.reshard()             # hold the shards, which model.parameters() gives only once resharded
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel exists on CPU and CUDA; on CPU it cut the step of a 135M model from 0.36 s to 0.08 s
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`. `step` counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model, micro_batches, device, dtype: str, clip: float = 1.0):
    """One optimiser step over several micro-batches. Returns (token-mean loss, grad norm, answer tokens).

    The loss is divided by the answer tokens of the whole step on every rank (runtime.sum_int), and the ranks'
    gradients are summed, so neither --grad-accum nor the number of ranks changes the gradient."""
    n_tokens = runtime.sum_int(sum(n_answer_tokens(b) for b in micro_batches))  # global: accumulation-invariant
    total = 0.0
    for batch in micro_batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            loss = sft_loss_sum(model, batch) / max(n_tokens, 1)
        loss.backward()
        total += float(loss.detach())
    grad_norm = runtime.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    return runtime.sum_float(total), grad_norm, n_tokens


def apply_update(optimizer, lr: float, step: int, loss: float, grad_norm: float):
    """Refuse non-finite values before they reach the weights, then step."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise UserError(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                        f"(loss={loss}, grad_norm={grad_norm}); try a lower --lr or --dtype fp32. "
                        "No checkpoint was written for it")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

# -----------------------------------------------------------------------------
# run directories, checkpoints and resume state


class MetricsLog:
    """Appends one JSON object per line to out/metrics.jsonl, flushed each time."""

    def __init__(self, path):
        self.path = Path(path)

    def log(self, row: dict):
        if not runtime.is_main():  # under torchrun every rank has the same global numbers; rank 0 writes them
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] \
            if self.path.exists() else []

    def truncate_after(self, step: int):
        """On resume, forget lines the interrupted run wrote after the checkpoint it resumes from."""
        if self.path.exists() and runtime.is_main():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the half line a killed process left
                    continue
                if row.get("step", 0) <= step:
                    keep.append(row)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


# config keys that do not change what a run computes, so --resume may differ in them: where the output goes and
# how it is logged, the device (the same math; rounding aside), --preset (its values are resolved into the other
# keys, which are compared), the no-grad scoring batch size (padding is masked: the same values up to rounding),
# and the cache locations (their contents are keyed by what they depend on)
RESUME_FREE = ("resume", "overwrite", "out", "log_every", "eval_batch_size", "device", "preset", "probe_cache",
               "aw_table", "activation_checkpointing", "max_shard_gb")


def config_diff(old, new, name: str = "") -> tuple[str, object, object] | None:
    """The first (key, old value, new value) where two resolved configs differ, descending into dicts (so a
    fingerprint names its model: inputs.teacher.4); a key the old config lacks (an older version) is skipped."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in new:
            if k in old:
                found = config_diff(old[k], new[k], f"{name}.{k}" if name else str(k))
                if found:
                    return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):  # JSON turns tuples into lists
        return next((d for d in (config_diff(a, b, name) for a, b in zip(old, new)) if d), None)
    return None if old == new else (name, old, new)


def prepare_out_dir(out, config: dict, resume: bool, overwrite: bool, free=RESUME_FREE) -> Path:
    """Make sure --out is ours to write: refuse another run's dir unless --resume or --overwrite.

    --resume compares every key of the resolved config except those in `free` (which do not change the result)
    with out/config.json, and refuses the first difference by name. The saved config.json is the record of the
    run: a resume leaves it as it is.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    saved = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise UserError(f"--out {out}: already holds a run; pass --resume to continue it or --overwrite "
                            "to replace it")
        elif saved.exists():
            old = read_json(saved)
            diff = config_diff({k: v for k, v in old.items() if k not in free},
                               {k: v for k, v in json.loads(json.dumps(config)).items() if k not in free})
            if diff:
                k, a, b = diff
                raise UserError(f"--resume: {saved} has {k}={short(a)} but this run has {k}={short(b)}; "
                                "resume with the same flags")
    elif resume:
        raise UserError(f"--resume: {out} holds no run to resume")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # what a killed run was writing, here or in a subdir (resume/, aw_anchor/): never complete, never listed
        for tmp in [*out.glob(".tmp-*"), *out.glob("*/.tmp-*")]:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if not (resume and saved.exists()):
            atomic_write_text(saved, json.dumps(config, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror})") from None
    return out


def short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def items_fingerprint(items: list[dict]) -> str:
    """sha256 of the encoded examples (ids, tokens, labels): an edited data file or another template is another
    fingerprint, even under the same flags."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["input_ids"], it["labels"]]).encode())
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints, by step. A step_XXXXXX dir only ever appears by an atomic rename, so it is whole."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit() and (p / "meta.json").exists():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def read_checkpoint_index(run_dir) -> dict:
    """{"steps": [...], "best": step, "final": step | None}; rebuilt from the dirs if the index is missing."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"{run_dir}: no complete checkpoints (step_XXXXXX/ with meta.json); "
                        "run sft.py for it first")
    index = read_json(run_dir / CHECKPOINT_INDEX) if (run_dir / CHECKPOINT_INDEX).exists() else {}
    steps = [s for s, _ in ckpts]
    metas = {s: read_json(p / "meta.json") for s, p in ckpts}
    scored = [s for s in steps if metas[s].get("val_loss") is not None]
    best = min(scored, key=lambda s: metas[s]["val_loss"]) if scored else steps[-1]
    final = index.get("final") if index.get("final") in steps else None
    return {"steps": steps, "best": best, "final": final, "metric": "val_loss"}


def checkpoint_steps(run_dir, spec: str, flag: str = "--steps") -> list[int]:
    """The checkpoint steps a `--steps` value names: 'all', or comma-separated 'best', 'final' and step numbers."""
    index = read_checkpoint_index(run_dir)
    if spec == "all":
        return index["steps"]
    named = {"best": index["best"], "final": index["final"] if index["final"] is not None else index["steps"][-1]}
    try:
        steps = sorted({named[s] if s in named else int(s) for s in spec.split(",")})
    except ValueError:
        raise UserError(f"{flag} {spec!r}: expected 'all', 'best', 'final' or step numbers") from None
    missing = [s for s in steps if s not in index["steps"]]
    if missing:
        raise UserError(f"{flag}: {run_dir} has no checkpoint step {missing[0]} (has {index['steps']})")
    return steps


def write_checkpoint_index(run_dir, final: int | None = None, extra: dict | None = None):
    """checkpoints.json from the complete checkpoint dirs; `extra` (how the footsteps were placed) is a record for
    the reader only."""
    index = read_checkpoint_index(run_dir)
    if final is not None:
        index["final"] = final
    index.update(extra or {})
    atomic_write_text(Path(run_dir) / CHECKPOINT_INDEX, json.dumps(index, indent=2) + "\n")
    return index


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """AdamW state as flat tensors (safetensors, no pickle) + the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(optimizer, tensors: dict, info: dict):
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(run_dir, step: int, model, tok, meta: dict, train_state: dict | None = None, optimizer=None,
                    save_dtype=None, name: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write run_dir/step_XXXXXX/ (or run_dir/<name>/) atomically in HF layout, plus meta.json and (optionally)
    the resume state. Under torchrun every rank calls it: rank 0 writes the model from the full state dict gathered
    to its CPU, and each rank its shard of the resume state.

    train_state is the loop's JSON-able position ({"step", "tokens_seen", ...}); with it the dir also holds the RNG
    state and `optimizer`'s state. One process: trainer_state.safetensors (flat tensors) + trainer_state.json. Under
    torchrun: dcp/ (model and optimiser, sharded by rank, torch.distributed.checkpoint), rng_rank{r}.safetensors and
    trainer_state.json. Only the newest checkpoint keeps a resume state.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    path = run_dir / (name or checkpoint_name(step))
    state = runtime.full_state_dict(model)  # a collective under FSDP: every rank takes part
    with runtime.atomic_dir_all(path) as tmp:
        info = None if train_state is None else dict(train_state)
        if train_state is not None and runtime.world() > 1:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None \
                else (runtime.sharded_state_dict(model), {})
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
            save_file(rng_state(), str(tmp / f"rng_rank{runtime.rank()}.safetensors"))
            info.update(world=runtime.world(), optimizer=optimizer is not None)
        if runtime.is_main():
            save_model(model, tmp, dtype=save_dtype, state=state, max_shard_bytes=max_shard_bytes)
            for f in tok.files:
                shutil.copy2(f, tmp / Path(f).name)
            if info is not None and runtime.world() == 1:
                tensors = rng_state()
                if optimizer is not None:
                    opt_tensors, opt_json = optimizer_tensors(optimizer)
                    tensors.update(opt_tensors)
                    info.update(opt_json)
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_FILES[0]))
            if info is not None:
                (tmp / STATE_FILES[1]).write_text(json.dumps(info, indent=2) + "\n")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the dir complete
    if train_state is not None and runtime.is_main():  # the resume state is large (2x the model): newest only
        for s, p in list_checkpoints(run_dir):
            if s < step:
                for f in STATE_FILES:
                    (p / f).unlink(missing_ok=True)
                for f in p.glob("rng_rank*.safetensors"):
                    f.unlink()
                shutil.rmtree(p / DCP_DIR, ignore_errors=True)
    runtime.barrier()
    return path


def has_resume_state(path: Path) -> bool:
    """Whether a checkpoint dir holds a resume state: one process's or a torchrun run's."""
    return (path / STATE_FILES[1]).exists() and ((path / STATE_FILES[0]).exists()
                                                 or (path / DCP_DIR / ".metadata").exists())


def latest_resumable(run_dir):
    """(step, path) of the newest complete checkpoint that holds resume state, or None."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if has_resume_state(path):
            return step, path
    return None


def load_resume_state(path: Path, model, optimizer=None) -> dict:
    """Restore what save_checkpoint wrote with a train_state: the optimiser's state (and under torchrun the
    model's shards), the RNG; returns the loop position. The model must already hold the dir's weights in one
    process (load_model(path)); under torchrun it is sharded and its shards are read here."""
    from safetensors.torch import load_file

    info = read_json(path / STATE_FILES[1])
    saved_world = info.get("world", 1)
    if saved_world != runtime.world():
        raise UserError(f"--resume: {path} was written by {saved_world} rank(s), this run has {runtime.world()}; "
                        f"resume with the same torchrun --nproc_per_node")
    if runtime.world() == 1:
        tensors = load_file(str(path / STATE_FILES[0]))
        if optimizer is not None and any(k.startswith("optim.") for k in tensors):
            load_optimizer_tensors(optimizer, tensors, info)
        restore_rng(tensors)
        return info
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is not None and info.get("optimizer"):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": runtime.sharded_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        runtime.load_sharded_state_dict(model, state["model"])
    restore_rng(load_file(str(path / f"rng_rank{runtime.rank()}.safetensors")))
    return info


def rng_state() -> dict:
    t = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    return t


def restore_rng(tensors: dict):
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])

# -----------------------------------------------------------------------------
# the SFT run


def expected_minutes(model, n_tokens: int, device, dtype: str) -> float:
    """Rough duration: 6·N·tokens FLOPs, N without the embeddings (the LM head runs only at answer positions), at
    half of a matmul throughput measured here for a moment."""
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = n * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    n_body = model.num_params() - model.model.embed_tokens.weight.numel()
    return 6 * n_body * n_tokens / (0.5 * flops) / 60


def even_steps(total: int, every: int) -> list[int]:
    """The paper's footsteps: every `every` optimiser steps, and the final step."""
    return sorted({*range(every, total + 1, every), total})


def geometric_steps(total: int, n: int) -> list[int]:
    """n footsteps dense early, where the teacher moves most: step_k = round(total^(k/n)) for k = 1..n, a geometric
    sequence of ratio total^(1/n) that ends on the final step. Steps that round onto the previous one move up by
    one (and never past total − (n − k), so the final step stays last): n distinct steps in [1, total].
    For total 100, n 4: 3, 10, 32, 100."""
    if not 1 <= n <= total:
        raise UserError(f"--checkpoints {n}: geometric spacing needs 1 to {total} (the run's steps) checkpoints")
    out = []
    for k in range(1, n + 1):
        s = max(round(total ** (k / n)), out[-1] + 1 if out else 1)
        out.append(min(s, total - (n - k)))
    return out


def val_loss_steps(curve: dict[int, float], n: int) -> list[int]:
    """Footsteps at equal shares of the validation loss's drop. curve maps steps to val loss, step 0 the start.

    With L0 the loss at step 0 and Lmin the lowest on the curve, level k (k = 1..n) is L0 − k/n · (L0 − Lmin); its
    footstep is the first step whose loss reaches it, so level n is the best step. The final step is always kept
    as well. Levels crossed within one interval of the curve share a step, so there can be fewer than n (+1)."""
    steps = sorted(curve)
    l0, lmin = curve[steps[0]], min(curve[s] for s in steps[1:])
    keep = {steps[-1]}
    if lmin < l0:  # a loss that never fell below its start has no shares to place: only the final step
        for k in range(1, n + 1):
            level = lmin if k == n else l0 - k / n * (l0 - lmin)  # exactly Lmin at k = n, whatever the rounding
            keep.add(next(s for s in steps[1:] if curve[s] <= level))
    return sorted(keep)


def spaced_steps(spacing: str, total: int, n: int, save_every: int = 0) -> list[int]:
    """The save steps of an even or geometric run (val_loss spacing decides from the curve: val_loss_steps)."""
    if spacing == "geometric":
        return geometric_steps(total, n)
    return even_steps(total, save_every or math.ceil(total / n))


def subset_steps(steps: list[int], n: int, spacing: str) -> list[int]:
    """n of a run's checkpoint steps placed by a spacing rule on its final step T: for each target (even: k·T/n,
    rounded; geometric: geometric_steps(T, n)), the nearest saved step (the earlier on a tie). The final step is always
    one of them. Refused when two targets land on one saved step: the run is too coarse for n."""
    if not 1 <= n <= len(steps):
        raise UserError(f"--candidates {n}: the teacher run has {len(steps)} checkpoints ({steps})")
    total = steps[-1]
    targets = geometric_steps(total, n) if spacing == "geometric" else [round(k * total / n) for k in range(1, n + 1)]
    chosen = [min(steps, key=lambda s: (abs(s - t), s)) for t in targets]
    if len(set(chosen)) < n:
        raise UserError(f"--candidates {n} --candidate-spacing {spacing}: targets {targets} fall on the teacher's "
                        f"checkpoints {chosen}, fewer than {n} distinct ones; its run saved too few ({steps})")
    return chosen


def build_batches(items, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """This epoch's optimiser steps, each a list of micro-batches (lists of item indices). Depends only on
    (seed, epoch), so a resumed run sees the same order. Under torchrun these are the global micro-batches
    (batch_size = --batch-size x ranks); rank_batch deals each one out."""
    lengths = [len(it["input_ids"]) for it in items]
    batches = data.length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch)
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def rank_batch(items: list[dict], indices: list[int], pad_id: int) -> dict:
    """This rank's share of a global micro-batch, dealt round-robin (rank r takes examples r, r + N, ...), so N ranks
    of batch b together see the batch of one process with --batch-size N*b. A short last batch can leave a rank
    with nothing: it then runs one of the examples with every label masked, because FSDP needs every rank in every
    forward and backward, and a batch with no answer tokens adds nothing to the loss or the gradient."""
    share = indices[runtime.rank()::runtime.world()]
    if share:
        return data.collate([items[i] for i in share], pad_id)
    batch = data.collate([items[indices[0]]], pad_id)
    batch["labels"].fill_(-100)
    batch["ids"] = []
    return batch


def validate(model, tok, args, val_examples, val_items, device) -> dict:
    """Val loss and the task metric, by the same functions evaluate.py uses."""
    out = {"val_loss": eval_loss(model, val_items, tok.pad_id, args.eval_batch_size, device, args.dtype)}
    if val_examples:
        metrics, _ = evaluate.evaluate(model, tok, args.task, val_examples, batch_size=args.eval_batch_size,
                                       max_new_tokens=args.eval_max_new_tokens or None, dtype=args.dtype)
        out["val_metric"] = metrics["main"]
        out["val_metrics"] = metrics
    return out


def train(args) -> Path:
    """The whole SFT run for one role, top to bottom. Returns the final checkpoint dir."""
    device = resolve_device(args.device)
    runtime.init_distributed(device)  # torchrun: one process per rank; without it, nothing
    args.dtype = resolve_dtype(args.dtype, device)
    seed_everything(args.seed)
    world = runtime.world()
    # everything a user can get wrong is checked before --out is touched
    tok = data.load_tokenizer(args.model)
    train_examples, train_items = load_split(tok, args, "train", args.train_size)
    val_examples, val_items = load_split(tok, args, "val", args.val_size)
    if not train_items:
        raise UserError(f"task {args.task}: the training split is empty")
    data.check_generation_flag(args.task, train_examples, "--eval-max-new-tokens", args.eval_max_new_tokens)
    config = {**vars(args), "device": str(device), "world": world,
              "inputs": {"train": items_fingerprint(train_items), "val": items_fingerprint(val_items)}}
    global_batch = args.batch_size * world  # --batch-size is per rank
    steps_per_epoch = len(build_batches(train_items, global_batch, args.grad_accum, args.seed, 0))
    total = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(args.warmup * total)
    spacing = getattr(args, "spacing", "even")
    if spacing == "val_loss" and not val_items:
        raise UserError(f"--spacing val_loss: task {args.task} has no validation examples to measure the drop on")
    if spacing == "val_loss":  # every eval step saves a candidate; the footsteps are chosen from them at the end
        eval_every = args.eval_every or math.ceil(total / (4 * args.checkpoints))
        save_at = set(even_steps(total, eval_every))
    else:
        save_at = set(spaced_steps(spacing, total, args.checkpoints, args.save_every))
    model = load_model(args.model, device=device)
    out = runtime.main_first(prepare_out_dir, args.out, config, args.resume, args.overwrite)
    if model.args.vocab_size < tok.vocab_size:
        raise UserError(f"--model {args.model}: vocab_size {model.args.vocab_size} is smaller than its "
                        f"tokenizer's {tok.vocab_size}")

    step, tokens_seen, found = 0, 0, None
    log = MetricsLog(out / "metrics.jsonl")
    if args.resume:
        found = latest_resumable(out)
        if found is None:
            raise UserError(f"--resume: {out} has no complete checkpoint with resume state")
        step, path = found
        del model  # one copy at a time: the checkpoint's weights replace the starting ones
        model = load_model(path, device=device)
    model.set_activation_checkpointing(args.activation_checkpointing)
    model = runtime.shard(model, device, args.dtype)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)  # after shard: it steps this rank's shards
    if found is not None:
        info = load_resume_state(path, model, optimizer)
        tokens_seen = info["tokens_seen"]
        log.truncate_after(step)
        runtime.print0(f"resuming from {path} (step {step} of {total})")

    n_tokens = sum(len(it["input_ids"]) for it in train_items) * args.epochs
    runtime.print0(f"{args.role} SFT: {len(train_items)} train / {len(val_items)} val examples of {args.task}, "
                   f"{total} steps ({steps_per_epoch}/epoch, batch {args.batch_size}x{args.grad_accum}"
                   + (f"x{world} ranks" if world > 1 else "") + "), "
                   f"{model.num_params() / 1e6:.1f}M params on {device}; expected about "
                   f"{expected_minutes(model, n_tokens, device, args.dtype):.0f} min of training plus evals")

    if spacing == "val_loss" and step == 0:  # L0, the start of the drop that the footsteps share
        log.log({"step": 0, "eval": True,
                 "val_loss": eval_loss(model, val_items, tok.pad_id, args.eval_batch_size, device, args.dtype)})
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"sft {args.role}", dynamic_ncols=True, disable=not runtime.is_main())
    t_log, tok_log = time.perf_counter(), 0
    try:
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            micro = [rank_batch(train_items, mb, tok.pad_id)
                     for mb in build_batches(train_items, global_batch, args.grad_accum, args.seed, epoch)[k]]
            lr = lr_at(step, total, warmup, args.lr)
            loss, grad_norm, _ = train_step(model, micro, device, args.dtype)
            apply_update(optimizer, lr, step, loss, grad_norm)
            step += 1
            batch_tokens = runtime.sum_int(sum(int(b["attention_mask"].sum()) for b in micro if b["ids"]))
            tokens_seen += batch_tokens
            tok_log += batch_tokens
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                dt = time.perf_counter() - t_log
                row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_seen": tokens_seen, "tok_per_s": tok_log / dt}
                log.log(row)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_per_s']:.0f}")
                t_log, tok_log = time.perf_counter(), 0
            if step in save_at:
                model.eval()
                if spacing == "val_loss" and step < total:  # a candidate: the loss decides, generation would cost
                    val = {"val_loss": eval_loss(model, val_items, tok.pad_id, args.eval_batch_size, device,
                                                 args.dtype)}
                else:
                    val = validate(model, tok, args, val_examples, val_items, device)
                model.train()
                log.log({"step": step, "eval": True, **val})
                meta = {"step": step, "epoch": step / steps_per_epoch, "tokens_seen": tokens_seen, "train_loss": loss,
                        **val, "role": args.role, "task": args.task, "config": config}
                save_checkpoint(out, step, model, tok, meta, train_state={"step": step, "tokens_seen": tokens_seen},
                                optimizer=optimizer, max_shard_bytes=int(args.max_shard_gb * 2**30))
                # with val_loss spacing the run is final only once the candidates are pruned
                runtime.main_first(write_checkpoint_index, out,
                                   step if step == total and spacing != "val_loss" else None)
                runtime.print0(f"step {step}: val_loss {val['val_loss']:.4f}"
                               + (f", val {args.task} {val['val_metric']:.4f}" if "val_metric" in val else "")
                               + f" -> {out / checkpoint_name(step)}")
    finally:  # closed on any exit, so an error message starts on a line of its own
        bar.close()
    runtime.barrier()
    if runtime.is_main():
        finish(out, args, log, spacing, eval_every if spacing == "val_loss" else 0, total)
    runtime.barrier()
    return out / checkpoint_name(total)


def finish(out: Path, args, log: MetricsLog, spacing: str, eval_every: int, total: int):
    """The end of a run (rank 0): with --spacing val_loss, drop the candidates that are no footstep; the final
    index."""
    extra = {}
    if spacing == "val_loss":
        curve = {r["step"]: r["val_loss"] for r in log.rows() if r.get("eval")}
        keep = val_loss_steps(curve, args.checkpoints)
        for s, path in list_checkpoints(out):
            if s not in keep:  # renamed first, so a kill mid-delete leaves no half checkpoint under a step name
                tmp = out / f".tmp-drop-{path.name}"
                path.rename(tmp)
                shutil.rmtree(tmp)
        extra = {"spacing": "val_loss", "eval_every": eval_every, "val_curve": {str(k): v for k, v in curve.items()}}
    elif spacing != "even":
        extra = {"spacing": spacing}
    index = write_checkpoint_index(out, final=total, extra=extra)
    print(f"done: {len(index['steps'])} checkpoints in {out}; best (val loss) step {index['best']}, "
          f"final step {index['final']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--role", choices=sorted(ROLE_DEFAULTS), default="teacher",
                   help="which model to fine-tune; sets the defaults of --model, --out, --lr, --epochs")
    p.add_argument("--model", default=None, help="HF Llama model dir to start from (teacher: models/teacher, "
                                                 "student: models/student)")
    p.add_argument("--save-every", type=int, default=0,
                   help="optimiser steps between checkpoints of --spacing even; 0 = auto: --checkpoints evenly "
                        "spaced (10 for the teacher, its footsteps; only the final one for the student)")
    p.add_argument("--spacing", choices=SPACINGS, default="even",
                   help="where the checkpoints are: even (the paper), geometric (dense early: step_k = "
                        "total^(k/n)), val_loss (at equal shares of the validation loss's drop; see val_loss_steps)")
    p.add_argument("--checkpoints", type=int, default=None,
                   help="how many checkpoints (teacher 10, student 1). --spacing even saves every "
                        "ceil(total/N) steps and the final step, which can be fewer than N (126 steps, N 20: "
                        "every 7, 18 checkpoints); --spacing val_loss: the number of equal shares of the drop")
    p.add_argument("--eval-every", type=int, default=0,
                   help="--spacing val_loss: steps between the val-loss checks that each save a candidate "
                        "checkpoint (0 = 4 per footstep); the candidates that are no footstep are deleted at the end")
    add_common_args(p)
    given = given_flags(p, argv)
    args = p.parse_args(argv)
    if args.spacing != "even":
        refuse_unused(given, {"save_every": f"places even checkpoints; --spacing {args.spacing} places its own"})
    if args.spacing != "val_loss":
        refuse_unused(given, {"eval_every": "decides --spacing val_loss's footsteps; drop it or add that"})
    resolve_args(args, ROLE_DEFAULTS[args.role])
    for key in ("checkpoints", "eval_every"):
        if getattr(args, key) < (1 if key == "checkpoints" else 0):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: out of range (see --help)")
    train(args)


if __name__ == "__main__":
    run_cli(main)
