"""Per-sample losses of the frozen models, the AW weight, and the SFS/TFS analysis (arXiv 2601.10114, Sec. 3.1, 3.3).

    python weights.py                  # runs/student + every runs/teacher checkpoint -> runs/aw/

For every training example (keyed by its id) this scores the token-mean answer cross-entropy of the frozen SFT
student (L_stuSFT) and of each teacher checkpoint (L_ckpt), and stores them in one table,
runs/aw/losses.safetensors (one (n,) tensor per model, the ids and steps in its metadata). distill.py reads
L_stuSFT from it; its L_ckpt comes from the teacher logits it already has for the KD term.

AW gives each sample the KD weight w = σ(log L_stuSFT − log L_ckpt): where the SFT student already beats the
teacher (the Student-Favored Subdomain, SFS), w < ½ and the gold labels dominate, keeping the student's strength;
on the Teacher-Favored Subdomain (TFS), w > ½ and the teacher dominates. The analysis reports both subdomains.
"""

import argparse
import json
from pathlib import Path

import torch

import data
import runtime
from checkpoints import (checkpoint_name, checkpoint_steps, files_fingerprint, sft_model, item_digest,
                         model_fingerprint, read_checkpoint_index)
from flags import add_scoring_args, resolve_scoring_args
from losses import per_token_ce
from model import load_model
from runtime import UserError, atomic_write_text, run_cli, save_tensors
from train import answer_batches, load_split

LOSS_FLOOR = 1e-12  # a zero loss becomes this before the log: w stays defined when a model is perfect
LOSS_CEIL = 1e30  # an inf loss becomes this, so inf/inf cannot give NaN
STUDENT = "student_sft"  # name of L_stuSFT's column in the table

# -----------------------------------------------------------------------------
# AW and the per-sample losses


def aw_weight(loss_student: torch.Tensor, loss_ckpt: torch.Tensor) -> torch.Tensor:
    """AW's KD weight per sample: w = σ(log L_stuSFT − log L_ckpt) = L_stuSFT / (L_stuSFT + L_ckpt).

    The more the frozen SFT student loses against the teacher checkpoint on a sample, the more that sample's loss
    is KD and the less it is gold CE. Computed through the logs so 0 and huge losses give a finite w in [0, 1]
    (½ when both are 0 or both huge).
    """
    log_s = loss_student.float().clamp(LOSS_FLOOR, LOSS_CEIL).log()
    log_c = loss_ckpt.float().clamp(LOSS_FLOOR, LOSS_CEIL).log()
    return torch.sigmoid(log_s - log_c)


def sample_mean(values: torch.Tensor, sample_idx: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Token-mean of per-token values (N,) per sample (n_samples,), sample_idx[j] being token j's row.
    A sample without answer tokens gets 0."""
    sums = values.new_zeros(n_samples).index_add(0, sample_idx, values)
    counts = torch.bincount(sample_idx, minlength=n_samples).clamp(min=1)
    return sums / counts


def sample_losses(model, items: list[dict], pad_id: int, batch_size: int, device, dtype: str = "fp32",
                  desc: str | None = None) -> torch.Tensor:
    """Token-mean answer CE of each item (n,), in the items' order: L_stuSFT or L_ckpt of AW."""
    out = torch.zeros(len(items))
    for idx, logits, labels, rows in answer_batches(model, items, pad_id, batch_size, device, dtype, by_length=True,
                                                    desc=desc):
        out[idx] = sample_mean(per_token_ce(logits, labels), rows, len(idx)).cpu()
    return out

# -----------------------------------------------------------------------------
# SFS / TFS


def sfs_tfs(ids: list[str], loss_student: torch.Tensor, loss_teacher: torch.Tensor) -> dict:
    """Split the examples by which model handles them better (paper Sec. 3.1):

        SFS = {x : L_stuSFT(x) < L_teacher(x)}    (student-favored)     TFS = the rest (teacher-favored, ties too)

    Returns the share of each, and the mean loss gap on each side, both positive: the student's advantage on SFS,
    mean(L_teacher − L_stuSFT), and its deficit on TFS, mean(L_stuSFT − L_teacher). The student can beat the
    teacher overall when share_SFS · gap_SFS outweighs share_TFS · gap_TFS.
    """
    gap = loss_teacher.float() - loss_student.float()  # > 0: the student is better
    sfs = gap > 0
    n, n_sfs = len(ids), int(sfs.sum())
    return {
        "n": n,
        "sfs_share": n_sfs / n if n else 0.0,
        "tfs_share": (n - n_sfs) / n if n else 0.0,
        "sfs_gap": float(gap[sfs].mean()) if n_sfs else 0.0,
        "tfs_gap": float(-gap[~sfs].mean()) if n - n_sfs else 0.0,
        "mean_loss_student": float(loss_student.mean()) if n else 0.0,
        "mean_loss_teacher": float(loss_teacher.mean()) if n else 0.0,
        "sfs_ids": [i for i, s in zip(ids, sfs.tolist()) if s],
        "tfs_ids": [i for i, s in zip(ids, sfs.tolist()) if not s],
    }


def final_split(analysis: dict) -> dict:
    """The split of sfs_tfs.json measured against the final teacher (the one the report's sides use), else the
    first one there."""
    return next((v for k, v in analysis.items() if k.startswith("final")), next(iter(analysis.values())))


def format_sfs_tfs(rows: dict[str, dict]) -> str:
    """One line per reference teacher: shares and gaps, as a fixed-width table."""
    head = f"{'teacher':<20} {'n':>6} {'SFS share':>10} {'SFS gap':>9} {'TFS share':>10} {'TFS gap':>9} " \
           f"{'L_stuSFT':>9} {'L_teacher':>9}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<20} {r['n']:>6} {r['sfs_share']:>10.3f} {r['sfs_gap']:>9.4f} {r['tfs_share']:>10.3f} "
                     f"{r['tfs_gap']:>9.4f} {r['mean_loss_student']:>9.4f} {r['mean_loss_teacher']:>9.4f}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the loss table


def save_losses(path, ids: list[str], columns: dict[str, torch.Tensor], meta: dict):
    """One (n,) fp32 tensor per model; ids and `meta` as JSON in the safetensors metadata."""
    save_tensors(path, {k: v.float() for k, v in columns.items()}, {"ids": json.dumps(ids), "meta": json.dumps(meta)})


def load_losses(path) -> tuple[list[str], dict[str, torch.Tensor], dict]:
    """(ids, {column: (n,) tensor}, meta) from a table written by save_losses."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: loss table not found; run weights.py first")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            columns = {k: f.get_tensor(k) for k in f.keys()}
        ids, meta = json.loads(md["ids"]), json.loads(md["meta"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a loss table written by weights.py ({e})") from None
    bad = [k for k, v in columns.items() if v.shape != (len(ids),)]
    if bad:
        raise UserError(f"{path}: column {bad[0]!r} has shape {tuple(columns[bad[0]].shape)}, expected ({len(ids)},)")
    return ids, columns, meta


def table_key(task: str, max_len: int, dtype: str, device, tokenizer_files, student_dir) -> dict:
    """What a table's L_stuSFT values depend on besides the examples: task, max length, dtype, device kind, the
    tokenizer's files and the SFT student's weights (model.model_fingerprint); the path only for the reader."""
    return {"task": task, "max_len": max_len, "dtype": dtype, "device": torch.device(device).type,
            "tokenizer": files_fingerprint(tokenizer_files), "student_sft": str(Path(student_dir).resolve()),
            "student_sft_fingerprint": model_fingerprint(student_dir)}


def table_mismatch(meta: dict, ids: list[str], items: list[dict], key: dict) -> str | None:
    """Why a table (its meta and ids) cannot give these items' L_stuSFT, or None if it can: a key entry differs, or
    an item is missing or was encoded from other tokens."""
    for k, v in key.items():
        if k != "student_sft" and str(meta.get(k)) != str(v):
            return f"its {k} is {meta.get(k)!r}, this run's is {v!r}"
    digests = dict(zip(ids, meta.get("item_digests") or []))
    for it in items:
        if it["id"] not in digests:
            return f"it has no example {it['id']!r}"
        if digests[it["id"]] != item_digest(it):
            return f"example {it['id']!r} was scored from other tokens"
    return None


# -----------------------------------------------------------------------------
# AW's anchor: whose per-sample loss w compares the checkpoint's with


def student_losses_for(items: list[dict], paths, key: dict) -> tuple[torch.Tensor | None, list[str]]:
    """L_stuSFT of each item from the first loss table in `paths` made under `key` (table_key) from these very
    examples, or None; and why each table that exists was passed over."""
    why = []
    for path in paths:
        if not Path(path).is_file():
            why.append(f"{path}: not found")
            continue
        ids, columns, meta = load_losses(path)
        reason = "it has no L_stuSFT column" if STUDENT not in columns else table_mismatch(meta, ids, items, key)
        if reason is None:
            row = {i: k for k, i in enumerate(ids)}
            return columns[STUDENT][[row[it["id"]] for it in items]], why
        why.append(f"{path}: {reason}")
    return None, why


def lookup(ids: list[str], losses: torch.Tensor):
    """ids of a batch -> their losses (B,)."""
    by_id = dict(zip(ids, losses.tolist()))
    return lambda batch_ids: torch.tensor([by_id[i] for i in batch_ids])


class FrozenAnchor:
    """The paper's AW reference: L_stuSFT, the per-sample loss of the frozen SFT student, the same at every stage.
    Read from weights.py's table when it was made for this run (key, items), else scored once here and kept in
    `own` for a resume."""

    def __init__(self, student_sft: Path, items: list[dict], tok, key: dict, table, own: Path, batch_size: int,
                 device, dtype: str):
        losses, why = student_losses_for(items, [table, own], key)
        if losses is None and runtime.is_main():  # under torchrun rank 0 scores, the others read its table
            print(f"--aw-table {table} does not match this run ({'; '.join(why)}): scoring the SFT student "
                  f"{student_sft}")
            model = load_model(student_sft, device=device)
            losses = sample_losses(model, items, tok.pad_id, batch_size, device, dtype, "L_stuSFT")
            del model
            save_losses(own, [it["id"] for it in items], {STUDENT: losses},
                        {**key, "item_digests": [item_digest(it) for it in items]})
        runtime.barrier()
        if losses is None:
            losses, _ = student_losses_for(items, [own], key)
        self.losses = lookup([it["id"] for it in items], losses)

    def at_stage(self, stage: int, student):
        return self.losses


class StageAnchor:
    """Dynamic AW (--aw-anchor current, not in the paper): the anchor of w = σ(log L_anchor − log L_ckpt) is the
    student's own per-sample loss at the start of each stage, in place of the frozen SFT student's. Scored once per
    stage and kept in dir/stage_XX.safetensors, so a resumed stage reads the very values it used."""

    def __init__(self, dir: Path, items: list[dict], pad_id: int, batch_size: int, device, dtype: str):
        self.dir, self.items, self.pad_id, self.batch_size, self.device, self.dtype = (dir, items, pad_id,
                                                                                        batch_size, device, dtype)

    def at_stage(self, stage: int, student):
        path = self.dir / f"stage_{stage:02d}.safetensors"
        if runtime.broadcast_object(path.exists()):  # one decision for all ranks: scoring runs the sharded student
            ids, columns, _ = load_losses(path)
            return lookup(ids, columns["anchor"])
        losses = sample_losses(student, self.items, self.pad_id, self.batch_size, self.device, self.dtype,
                               f"AW anchor, stage {stage}")
        ids = [it["id"] for it in self.items]
        runtime.main_first(save_losses, path, ids, {"anchor": losses}, {"stage": stage})
        return lookup(ids, losses)

# -----------------------------------------------------------------------------
# the student's loss on each side, after every stage (--sides)


class SideLosses:
    """The student's mean answer loss on the SFS and on the TFS examples of weights.py's sfs_tfs.json (the final
    teacher's split), measured after every stage; refused when the file names examples this run does not train on."""

    def __init__(self, path, items: list[dict], pad_id: int, batch_size: int, device, dtype: str):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--sides {path}: not found; weights.py writes sfs_tfs.json")
        try:
            split = final_split(runtime.read_json(path))
            self.sides = {"sfs": list(split["sfs_ids"]), "tfs": list(split["tfs_ids"])}
        except (KeyError, TypeError, StopIteration, ValueError, AttributeError):
            raise UserError(f"--sides {path}: not an sfs_tfs.json written by weights.py") from None
        known = {it["id"] for it in items}
        missing = [i for ids in self.sides.values() for i in ids if i not in known]
        if missing:
            raise UserError(f"--sides {path}: example {missing[0]!r} is not in this run's training examples; "
                            "make the file with the same --task, --data and --train-size")
        self.items, self.pad_id, self.batch_size, self.device, self.dtype = items, pad_id, batch_size, device, dtype

    def __call__(self, student) -> dict:
        losses = sample_losses(student, self.items, self.pad_id, self.batch_size, self.device, self.dtype,
                               "stage-end losses")
        return side_means(losses, self.items, self.sides)


def side_means(losses: torch.Tensor, items: list[dict], sides: dict[str, list[str]]) -> dict:
    """The mean answer loss (mean over examples of the token-mean CE) on the SFS and on the TFS examples."""
    row = {it["id"]: k for k, it in enumerate(items)}
    return {f"{side}_loss": float(losses[[row[i] for i in ids]].mean()) if ids else None
            for side, ids in sides.items()}

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="teacher SFT run dir holding step_XXXXXX checkpoints")
    p.add_argument("--student-sft", default="runs/student",
                   help="the frozen SFT student: its SFT run dir (the final checkpoint), a model dir or a "
                        "Hugging Face id")
    p.add_argument("--steps", default="all",
                   help="teacher checkpoints to score: 'all', 'best,final', or comma-separated steps")
    p.add_argument("--out", default="runs/aw", help="output dir for losses.safetensors and sfs_tfs.json")
    add_scoring_args(p)
    args = p.parse_args(argv)
    device = resolve_scoring_args(args, runtime.given_flags(p, argv))
    runtime.init_distributed(device)  # torchrun: each rank scores every N-th example with a whole copy of the model

    index = read_checkpoint_index(args.teacher)
    steps = checkpoint_steps(args.teacher, args.steps)
    student_dir = sft_model(args.student_sft)
    tok = data.load_tokenizer(student_dir)
    _, items = load_split(tok, args, "train", args.train_size)
    if not items:
        raise UserError(f"task {args.task}: the training split is empty")
    ids = [it["id"] for it in items]

    columns = {}
    runs = [(STUDENT, student_dir)] + [(checkpoint_name(s), Path(args.teacher) / checkpoint_name(s)) for s in steps]
    mine = list(range(runtime.rank(), len(items), runtime.world()))  # all of them in one process
    for name, path in runs:  # one model in memory at a time
        model = load_model(path, device=device)
        part = sample_losses(model, [items[i] for i in mine], tok.pad_id, args.batch_size, device, args.dtype,
                             desc=name if runtime.is_main() else None)
        del model
        columns[name] = torch.zeros(len(items))
        columns[name][mine] = part
        columns[name] = runtime.all_reduce_sum(columns[name])  # the ranks' rows are disjoint: the sum joins them
        runtime.print0(f"{name}: mean answer CE {columns[name].mean():.4f} ({path})")
    if not runtime.is_main():  # rank 0 writes the tables
        return

    out = Path(args.out)
    meta = {**table_key(args.task, args.max_len, args.dtype, device, tok.files, student_dir),
            "teacher": str(args.teacher), "steps": steps, "best": index["best"], "final": index["final"],
            "models": {name: model_fingerprint(path) for name, path in runs},
            "item_digests": [item_digest(it) for it in items]}
    save_losses(out / "losses.safetensors", ids, columns, meta)
    analysis = {}
    for role in ("best", "final"):
        step = index[role]
        if step is not None and step in steps:
            analysis[f"{role} (step {step})"] = sfs_tfs(ids, columns[STUDENT], columns[checkpoint_name(step)])
    print(format_sfs_tfs(analysis))
    atomic_write_text(out / "sfs_tfs.json", json.dumps(analysis, indent=2) + "\n")
    atomic_write_text(out / "config.json", json.dumps({**vars(args), "device": str(device),
                                                       "world": runtime.world()}, indent=2) + "\n")
    print(f"wrote {out / 'losses.safetensors'} ({len(ids)} examples x {len(columns)} models), {out / 'sfs_tfs.json'}")


if __name__ == "__main__":
    run_cli(main)
