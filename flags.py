"""The command lines of the training and scoring scripts: the flags they share, the presets that fill them, and the
checks that turn a bad value into one error line before any work starts."""

import argparse

import torch

import data
import hub
from model import MAX_SHARD_BYTES
from runtime import UserError, resolve_device, resolve_dtype

PRESETS = {
    # minutes on 2 CPU cores: a slice of the training split, short sequences
    "cpu": dict(train_size=500, val_size=64, max_len=256, batch_size=8, dtype="auto"),
    # the paper's setting (Sec. 4.1): full splits, max length 512, batch 8, bf16
    "gpu": dict(train_size=0, val_size=0, max_len=512, batch_size=8, dtype="auto", epochs=3),
}

# -----------------------------------------------------------------------------


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
    a("--stop-repeats", action="store_true",
      help="generated answers (validation, the final evaluation) end before the first line they repeat: a greedy "
           "loop (evaluate.py --stop-repeats)")
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


def resolve_scoring_args(args, given: set[str]) -> torch.device:
    data.check_task_flags(args.task, args.data, args.data_dir, args.metric)
    for key in ("train_size", "max_len"):
        if getattr(args, key) is None:
            setattr(args, key, PRESETS[args.preset][key])
    if args.batch_size <= 0 or args.max_len <= 0 or args.train_size < 0:
        raise UserError("--batch-size and --max-len must be positive, --train-size >= 0")
    device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    hub.resolve_args(args, ("student_sft", "student", "tokenizer"), given)  # the model dirs among their flags
    return device


def resolve_args(args, role_defaults: dict, given: set[str]):
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
    hub.resolve_args(args, ("model", "init", "student_sft"), given)  # a Hugging Face id -> its snapshot dir
    return args


def distill_unused(args) -> dict[str, str]:
    """distill.py's flags that this run would ignore, each with what to do instead (runtime.refuse_unused refuses
    those given)."""
    unused = {}
    if args.aw:
        unused["alpha"] = "AW sets each sample's weight; --alpha is the fixed weight of --no-aw"
        if args.aw_anchor == "current":
            why = "is AW's frozen SFT reference; --aw-anchor current uses the student's own losses instead"
            unused.update(aw_table=why, student_sft=why)
    else:
        why = "is AW's reference (the frozen SFT student's losses); with --no-aw drop it, or drop --no-aw"
        unused.update(aw_table=why, student_sft=why, aw_anchor="chooses AW's reference; --no-aw has none")
    if args.schedule != "td":
        unused["td_ckpt"] = f"is the one teacher of --schedule td; --schedule {args.schedule} picks one per stage"
    else:
        unused["candidates"] = "chooses the checkpoints a schedule walks; --schedule td uses one"
    if not args.candidates:
        unused["candidate_spacing"] = "places --candidates; without it every checkpoint is a candidate"
    if args.schedule == "scd" and args.teacher_cache:
        unused["probe_cache"] = "holds probe log-probs computed by teacher forwards; --teacher-cache has them already"
    if args.schedule != "scd":
        why = f"is SCD's probe; --schedule {args.schedule} does not score checkpoints"
        unused.update(probe_size=why, probe_cache=why)
        why = f"changes how SCD chooses; --schedule {args.schedule} does not score checkpoints"
        unused.update(metric_balance=why, metric2_weight=why, forward_only=why)
    elif args.metric_balance != "weight":
        unused["metric2_weight"] = f"is the w of --metric-balance weight, not of --metric-balance {args.metric_balance}"
    if args.teacher_cache:
        unused["teacher_sharding"] = "places the teacher model on the ranks; --teacher-cache loads no teacher"
    if args.loss != "jsd":
        unused["beta"] = f"is the β of --loss jsd; --loss {args.loss} has none"
    if args.loss not in ("skew_fkl", "skew_rkl"):
        unused["lam"] = f"is the λ of --loss skew_fkl / skew_rkl; --loss {args.loss} has none"
    if args.loss != "taid":
        why = f"is a parameter of --loss taid's schedule; --loss {args.loss} has none"
        unused.update(taid_t_start=why, taid_alpha=why, taid_beta=why)
    if args.stage_epochs:
        why = "--stage-epochs sets the length of every stage; drop one of them"
        unused.update(epochs=why, max_steps=why, stage_steps=why)
    elif args.stage_steps:
        why = "--stage-steps sets the length of every stage; drop one of them"
        unused.update(epochs=why, max_steps=why)
    if args.eval_split == "none":
        why = "there is no final evaluation with --eval-split none"
        unused.update(eval_size=why, **({} if args.on_policy else {"max_new_tokens": why}))
    return unused
