"""Run directories: the resolved config, metrics.jsonl, checkpoints in Hugging Face layout, the resume state, and
the fingerprints every cache and resume check keys on.

A checkpoint dir is written to a temp dir and renamed, so a step_XXXXXX/, stage_XX/ or final/ that exists is whole.
A resume state (the optimiser, the RNG and the loop's position) rides in the newest checkpoint dir only: flat
safetensors in one process, torch.distributed.checkpoint (sharded by rank) under torchrun.

One recipe fingerprints examples (item_digest, items_fingerprint: ids, tokens and labels) and one fingerprints
models (model_fingerprint: config.json and the weight files, by sha256).
"""

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

import runtime
from model import MAX_SHARD_BYTES, checkpoint_files, save_model
from runtime import UserError, atomic_write_text, read_json

CHECKPOINT_INDEX = "checkpoints.json"
STATE_FILES = ("trainer_state.safetensors", "trainer_state.json")  # the resume state of one process
DCP_DIR = "dcp"  # the resume state of a torchrun run: model and optimiser, sharded by rank

# -----------------------------------------------------------------------------
# fingerprints


SHA256_RECORD_BYTES = 1 << 24  # files from 16 MiB up have their hash remembered in SHA256_CACHE
SHA256_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scd-distill" / "sha256"


def file_sha256(path) -> str:
    """sha256 of a file's bytes. For a file from 16 MiB up it is remembered in SHA256_CACHE (one small JSON per
    file, under ~/.cache) with the file's real path, inode, size and mtime_ns, and taken again only when one of
    them changes.

    The full hash is the strong fingerprint the caches need (a sampled one can miss a retrained tensor); it costs
    about a second per GB, so it is taken once per file version: a rewritten file has a new mtime_ns (and usually
    size and inode). Only a rewrite in place that keeps the size and sets the old mtime back to the nanosecond
    (a deliberate `touch -d`) would reuse a stale hash. The record lives in the user's cache, not beside the
    weights, so model dirs stay as they are and read-only ones (a shared or hub cache) work; a copied model dir is
    hashed once more under its new path. Where the cache cannot be written, every call hashes.
    """
    path = Path(path)
    real = path.resolve()
    st = real.stat()
    stamp = {"path": str(real), "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    big = st.st_size >= SHA256_RECORD_BYTES
    record = SHA256_CACHE / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError):  # no record yet, or a torn one: hash the file
        saved = json.loads(record.read_text()) if big else {}
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    if big:
        with contextlib.suppress(OSError):  # a read-only cache dir only costs hashing again next time
            atomic_write_text(record, json.dumps({**stamp, "sha256": h.hexdigest()}) + "\n")
    return h.hexdigest()


def files_fingerprint(paths) -> str:
    """One sha256 over the names and contents of `paths` (the tokenizer's files, say); order matters."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{file_sha256(p)}\0".encode())
    return h.hexdigest()


def model_fingerprint(path) -> str:
    """The content fingerprint of a model dir every cache keys on: config.json and each weight file, by sha256.
    Another path to the same files gives the same fingerprint; a retrained checkpoint in the same dir does not."""
    path = Path(path)
    return files_fingerprint([path / "config.json", *checkpoint_files(path)])


def item_digest(item: dict) -> str:
    """A short hash of an encoded example: its id, tokens and labels, so the template, tokenizer, --max-len and the
    text itself are all in it (an edited JSONL line keeps its `file:line` id but not its digest)."""
    return hashlib.sha256(json.dumps([item["id"], item["input_ids"], item["labels"]]).encode()).hexdigest()[:16]


def items_fingerprint(items: list[dict]) -> str:
    """One sha256 over the examples' digests, in order: an edited data file or another template is another
    fingerprint, even under the same flags."""
    return hashlib.sha256("".join(item_digest(it) for it in items).encode()).hexdigest()

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
        """On resume, forget lines the interrupted run wrote after the checkpoint it resumes from, and its final
        evaluation's (written after the last step, done again by the resumed run)."""
        if self.path.exists() and runtime.is_main():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the half line a killed process left
                    continue
                if row.get("step", 0) <= step and not row.get("final_eval"):
                    keep.append(row)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


# config keys that do not change what a run computes, so --resume may differ in them: where the output goes and
# how it is logged, the device (the same math; rounding aside), --preset (its values are resolved into the other
# keys, which are compared), and the cache locations (their contents are keyed by what they depend on). The no-grad
# scoring batch size is not among them: it batches SCD's probe and AW's anchor, and rounding can flip a near tie
RESUME_FREE = ("resume", "overwrite", "out", "log_every", "device", "preset", "probe_cache",
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


def export(out: Path, name: str, step: int, model, tok, meta: dict, max_shard_gb: float) -> Path:
    """out/<name>/ in HF layout (a stage's or the final student), written whole or not at all."""
    return save_checkpoint(out, step, model, tok, meta, name=name, max_shard_bytes=int(max_shard_gb * 2**30))


def save_resume_state(out: Path, step: int, model, tok, meta: dict, progress: dict, optimizer=None):
    """out/resume/step_XXXXXX/ with the model, optimizer (if given), RNG and loop position; the older states go once
    the new one is complete, so a kill at any moment leaves one to resume from."""
    save_checkpoint(out / "resume", step, model, tok, meta, train_state=progress, optimizer=optimizer)
    if runtime.is_main():
        drop_older(out / "resume", step)
    runtime.barrier()


def drop_older(run_dir, step: int):
    """Delete a run dir's checkpoints before `step`: once the newest is complete, only it is needed to resume."""
    for s, path in list_checkpoints(run_dir):
        if s < step:
            shutil.rmtree(path)


def best_by_metric(run_dir) -> Path | None:
    """The checkpoint whose validation task metric (meta.json's val_metric) is highest, the earlier on a tie, as the
    paper reports each model; None when no checkpoint was scored by the metric."""
    scored = [(read_json(p / "meta.json").get("val_metric"), s, p) for s, p in list_checkpoints(run_dir)]
    scored = [(m, s, p) for m, s, p in scored if m is not None]
    return max(scored, key=lambda x: (x[0], -x[1]))[2] if scored else None


def sft_model(path) -> Path:
    """--student-sft: a model dir (it has weights) as it is, or an SFT run dir's final checkpoint. Not config.json:
    a run dir has one too, the run's resolved flags."""
    path = Path(path)
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return path if weights else final_checkpoint(path)


def final_checkpoint(run_dir) -> Path:
    """A run's final checkpoint (its newest if the run has no final yet): the frozen SFT student of AW."""
    index = read_checkpoint_index(run_dir)
    step = index["final"] if index["final"] is not None else index["steps"][-1]
    return Path(run_dir) / checkpoint_name(step)
