"""Supervised fine-tuning of the teacher and the student (arXiv 2601.10114, Sec. 3.1, steps 1 and 2).

The teacher's periodic checkpoints are the "footsteps" that SCD later walks the student along; the student's final
checkpoint is the frozen SFT reference that AW compares against. Both roles run the same loop:

    python sft.py --role teacher        # models/teacher -> runs/teacher/step_XXXXXX/ ...
    python sft.py --role student        # models/student -> runs/student/step_XXXXXX/ ...
    torchrun --nproc_per_node 8 sft.py --role teacher ...   # data-parallel, FSDP2 (runtime.py)

The loss is cross-entropy on answer tokens only, divided by the answer tokens of the whole step (train.py). Where
the teacher's footsteps are is --spacing (footsteps.py): even (the paper), geometric or val_loss; --checkpoints sets
how many. Under torchrun `--batch-size` is per rank, so N ranks train as one process with N times the batch.
"""

import argparse
from pathlib import Path

import data
import evaluate
import footsteps
import runtime
from checkpoints import (MetricsLog, checkpoint_name, items_fingerprint, latest_resumable, list_checkpoints,
                         load_resume_state, prepare_out_dir, save_checkpoint, write_checkpoint_index)
from flags import add_common_args, resolve_args
from model import load_model
from runtime import UserError, given_flags, refuse_unused, run_cli
from train import (Progress, apply_update, eval_loss, expected_minutes, load_splits, lr_at, make_optimizer,
                   run_length, step_batches, train_step)

# role defaults for the CPU-sized default run (NCBI-disease); --preset gpu switches to the paper's sizes.
# The pruned student learns more slowly than the teacher, so it gets a higher lr and more epochs.
ROLE_DEFAULTS = {
    "teacher": dict(model="models/teacher", out="runs/teacher", lr=2e-4, epochs=2, checkpoints=10),
    "student": dict(model="models/student", out="runs/student", lr=5e-4, epochs=3, checkpoints=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--role", choices=sorted(ROLE_DEFAULTS), default="teacher",
                   help="which model to fine-tune; sets the defaults of --model, --out, --lr, --epochs")
    p.add_argument("--model", default=None,
                   help="HF Llama model dir or Hugging Face id (owner/name[@revision]) to start from (teacher: "
                        "models/teacher, student: models/student)")
    p.add_argument("--save-every", type=int, default=0,
                   help="optimiser steps between checkpoints of --spacing even; 0 = auto: --checkpoints evenly "
                        "spaced (10 for the teacher, its footsteps; only the final one for the student)")
    p.add_argument("--spacing", choices=footsteps.SPACINGS, default="even",
                   help="where the checkpoints are: even (the paper), geometric (dense early: step_k = "
                        "total^(k/n)), val_loss (at equal shares of the validation loss's drop; see "
                        "footsteps.val_loss_steps)")
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
    resolve_args(args, ROLE_DEFAULTS[args.role], given)
    for key in ("checkpoints", "eval_every"):
        if getattr(args, key) < (1 if key == "checkpoints" else 0):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: out of range (see --help)")
    return args


def summary(args, model, train_items, val_items, total: int, steps_per_epoch: int, device) -> str:
    """The run in one line, with a rough duration (train.expected_minutes)."""
    n_tokens = sum(len(it["input_ids"]) for it in train_items) * args.epochs
    world = runtime.world()
    ranks = f"x{world} ranks" if world > 1 else ""
    return (f"{args.role} SFT: {len(train_items)} train / {len(val_items)} val examples of {args.task}, {total} steps "
            f"({steps_per_epoch}/epoch, batch {args.batch_size}x{args.grad_accum}{ranks}), "
            f"{model.num_params() / 1e6:.1f}M params on {device}; expected about "
            f"{expected_minutes(model, n_tokens, device, args.dtype):.0f} min of training plus evals")


def train(args) -> Path:
    """The whole SFT run for one role, top to bottom. Returns the final checkpoint dir."""
    device = runtime.resolve_device(args.device)
    runtime.init_distributed(device)  # torchrun: one process per rank; without it, nothing
    args.dtype = runtime.resolve_dtype(args.dtype, device)
    runtime.seed_everything(args.seed)
    # everything a user can get wrong is checked before --out is touched
    tok = data.load_tokenizer(args.model)
    _, train_items, val_examples, val_items = load_splits(tok, args, "--eval-max-new-tokens", args.eval_max_new_tokens)
    config = {**vars(args), "device": str(device), "world": runtime.world(),
              "inputs": {"train": items_fingerprint(train_items), "val": items_fingerprint(val_items)}}
    global_batch, steps_per_epoch, total = run_length(train_items, args)
    warmup = int(args.warmup * total)
    if args.spacing == "val_loss" and not val_items:
        raise UserError(f"--spacing val_loss: task {args.task} has no validation examples to measure the drop on")
    plan = footsteps.Footsteps(args.spacing, total, args.checkpoints, args.save_every, args.eval_every)

    def load(path):  # under torchrun sharded on the meta device, so each rank reads only its own rows
        return load_model(path, device=device, shard=lambda m: runtime.shard(m, device, args.dtype))

    model = load(args.model)
    out = runtime.main_first(prepare_out_dir, args.out, config, args.resume, args.overwrite)
    if model.args.vocab_size < tok.vocab_size:
        raise UserError(f"--model {args.model}: vocab_size {model.args.vocab_size} is smaller than its "
                        f"tokenizer's {tok.vocab_size}")

    step, tokens_seen, found = 0, 0, latest_resumable(out) if args.resume else None
    log = MetricsLog(out / "metrics.jsonl")
    if args.resume and found is None:
        raise UserError(f"--resume: {out} has no complete checkpoint with resume state")
    if found is not None:
        step, path = found
        del model  # one copy at a time: the checkpoint's weights replace the starting ones
        model = load(path)
    model.set_activation_checkpointing(args.activation_checkpointing)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)  # after shard: it steps this rank's shards
    if found is not None:
        tokens_seen = load_resume_state(path, model, optimizer)["tokens_seen"]
        log.truncate_after(step)
        runtime.print0(f"resuming from {path} (step {step} of {total})")
    runtime.print0(summary(args, model, train_items, val_items, total, steps_per_epoch, device))
    if plan.needs_start_loss and step == 0:  # L0, the start of the drop that the footsteps share
        log.log({"step": 0, "eval": True,
                 "val_loss": eval_loss(model, val_items, tok.pad_id, args.eval_batch_size, device, args.dtype)})

    model.train()
    progress = Progress(log, total, step, f"sft {args.role}", args.log_every, tokens_seen)
    try:
        while step < total:
            micro = step_batches(train_items, step, steps_per_epoch, global_batch, args.grad_accum, args.seed,
                                 tok.pad_id)
            lr = lr_at(step, total, warmup, args.lr)
            loss, grad_norm, _ = train_step(model, micro, device, args.dtype)
            apply_update(optimizer, lr, step, loss, grad_norm)
            step += 1
            progress.update(step, micro, {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr,
                                          "grad_norm": grad_norm}, last=step == total,
                            loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step in plan.save_at:  # a footstep (or a val_loss candidate): validate, then save
                val = evaluate.validate(model, tok, args, val_examples, val_items, device, plan.candidate_only(step))
                log.log({"step": step, "eval": True, **val})
                meta = {"step": step, "epoch": step / steps_per_epoch, "tokens_seen": progress.tokens_seen,
                        "train_loss": loss, **val, "role": args.role, "task": args.task, "config": config}
                save_checkpoint(out, step, model, tok, meta,
                                train_state={"step": step, "tokens_seen": progress.tokens_seen}, optimizer=optimizer,
                                max_shard_bytes=int(args.max_shard_gb * 2**30))
                runtime.main_first(write_checkpoint_index, out, plan.final_at(step))
                runtime.print0(f"step {step}: val_loss {val['val_loss']:.4f}"
                               + (f", val {args.task} {val['val_metric']:.4f}" if "val_metric" in val else "")
                               + f" -> {out / checkpoint_name(step)}")
    finally:  # closed on any exit, so an error message starts on a line of its own
        progress.close()
    runtime.barrier()
    if runtime.is_main():
        curve = {r["step"]: r["val_loss"] for r in log.rows() if r.get("eval")}
        index = write_checkpoint_index(out, final=total, extra=plan.finish(out, curve, list_checkpoints(out)))
        print(f"done: {len(index['steps'])} checkpoints in {out}; best (val loss) step {index['best']}, "
              f"final step {index['final']}")
    runtime.barrier()
    return out / checkpoint_name(total)


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
