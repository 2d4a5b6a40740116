"""Scheduled Checkpoint Distillation with Adaptive Weighting, and its baselines (arXiv 2601.10114, Sec. 3.2-3.3).

    python distill.py                                    # SCD + AW: models/student taught by runs/teacher's checkpoints
    python distill.py --schedule td --no-aw --alpha 1    # plain KD from the best teacher checkpoint
    python distill.py --schedule cd --loss jsd --beta 0.1
    python distill.py --teacher-cache runs/teacher_cache  # from teacher_cache.py's log-probs: no teacher forward

The run has --stages stages. At each stage start the scheduler picks a teacher checkpoint (schedule.py: SCD's
argmin of Metric 1 + Metric 2, CD's next, TD's one), and the optimiser and lr schedule start afresh. Each sample's
loss is w·KD + (1 − w)·CE_gold over its answer tokens, with w from AW (weights.aw_weight) or a fixed --alpha.

Output in runs/distill/<variant>/: stage_XX/ and final/ (HF layout; best/ too with --val-metric), schedule.jsonl
(one line per teacher choice), metrics.jsonl, config.json, resume/ (for --resume), the final evaluation in
final/eval_<task>_<split>.json, and AW's per-sample reference losses when they were scored here (aw_losses.safetensors,
or aw_anchor/ with --aw-anchor current).
The machinery around the loop (inputs checked, run dir, resume, torchrun, the teacher and AW sources) is in
distill_run.py.
"""

import argparse
import math

import torch

import runtime
import schedule
from distill_run import DistillRun
from flags import add_common_args, distill_unused, resolve_args
from losses import DIVERGENCES
from runtime import UserError, run_cli
from sft import ROLE_DEFAULTS
from train import answer_hidden, apply_update, idle_pass, lr_at, make_optimizer, n_answer_tokens, to_device
from weights import aw_weight, sample_mean

# lr and epochs as the student's SFT: the same data budget for every row of the comparison
DEFAULTS = {k: ROLE_DEFAULTS["student"][k] for k in ("lr", "epochs")}


def distill_step(student, teacher, anchor, kd_term, micro_batches: list[dict], alpha: float, device,
                 dtype: str) -> dict:
    """Gradients of one optimiser step, the paper's objective over the micro-batches' N answer tokens j:

        L = (1/N) Σ_j [w_s·KD_j + (1 − w_s)·CE_j],   w_s = σ(log L_stuSFT(s) − log L_ckpt(s)),  s token j's sample

    KD_j is the divergence (--loss) of the student from the teacher at token j and CE_j the student's gold CE;
    L_ckpt is the token-mean CE of the very teacher the KD term uses. Without AW (anchor None) w_s = alpha.

    Args:
        teacher: the stage's teacher (teachers.ModelTeacher or teacher_cache.CachedTeacher): targets(batch).
        anchor: ids -> L_stuSFT (B,) (weights.FrozenAnchor, or StageAnchor), or None.
        kd_term: losses.KDTerm (or TAIDTerm): the divergence per token, and the gold CE.
    Returns:
        token means of loss, KD and CE, the mean w, and the gradient norm before clipping.
    """
    n_tokens = max(runtime.sum_int(sum(n_answer_tokens(b) for b in micro_batches)), 1)  # the step's, all ranks
    sums, n_samples = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "w": 0.0}, 0
    for batch in micro_batches:
        if not batch["ids"]:  # this rank's empty share of a short last batch (torchrun)
            idle_pass(student, teacher, batch, device, dtype)
            continue
        batch = to_device(batch, device)
        B = batch["input_ids"].shape[0]
        target, ce_teacher = teacher.targets(batch)  # the teacher at the N answer positions: (N, V), (N,)
        with runtime.autocast(device, dtype):
            h, labels, rows = answer_hidden(student, batch)  # (N, D), (N,), the sample of each token (N,)
        if anchor is None:
            w = torch.full((B,), alpha, device=device)
        else:  # AW: w = L_stuSFT / (L_stuSFT + L_ckpt), per sample
            w = aw_weight(anchor(batch["ids"]).to(device), sample_mean(ce_teacher, rows, B))  # (B,)
        with runtime.autocast(device, dtype):
            kd, ce = kd_term(h, student.lm_logits, target, labels)  # KD_j (N,), CE_j (N,)
            loss = (w[rows] * kd + (1 - w[rows]) * ce).sum() / n_tokens
        loss.backward()
        sums["loss"] += float(loss.detach())
        sums["kd"] += float(kd.detach().sum()) / n_tokens
        sums["ce"] += float(ce.detach().sum()) / n_tokens
        sums["w"] += float(w.sum())
        n_samples += B
    sums = {k: runtime.sum_float(v) for k, v in sums.items()}  # each rank's share of the global means
    sums["w"] /= max(runtime.sum_int(n_samples), 1)
    sums["grad_norm"] = runtime.grad_norm_value(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0))
    return sums


def distill(args):
    """The staged loop, top to bottom. Returns out/final."""
    run = DistillRun(args)  # the inputs checked, the run dir, the student, the scheduler, teachers, AW anchor
    student = run.student
    while run.stage < args.stages:
        # stage start: choose a teacher checkpoint, get its teacher, a fresh optimiser
        chosen = run.scheduler.choose(run.stage, run.step, student)  # SCD: argmin Metric 1 + Metric 2
        teacher = run.teachers.get(chosen)  # the checkpoint, loaded or from the teacher cache
        anchor = run.anchor.at_stage(run.stage, student) if args.aw else None  # ids -> L_stuSFT
        optimizer = make_optimizer(student, args.lr, args.weight_decay)
        run.start_stage(chosen, optimizer)  # a mid-stage resume restores the optimiser's state here
        student.train()
        for k in range(run.k, run.stage_steps):  # from where a resumed stage stopped
            micro = run.batches()  # the gold answers, or (--on-policy) the student's own samples
            lr = lr_at(k, run.stage_steps, run.warmup, args.lr)
            stats = distill_step(student, teacher, anchor, run.kd_term, micro, args.alpha, run.device, args.dtype)
            apply_update(optimizer, lr, run.step, stats["loss"], stats["grad_norm"])
            run.end_step(micro, stats, lr, optimizer)  # step + 1; metrics.jsonl, the bar, --save-every states
        del optimizer
        run.end_stage()  # stage end: validation, the stage's export, the resume state
    return run.finish()  # the final export and its evaluation


def flag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--schedule", choices=schedule.SCHEDULES, default="scd",
      help="teacher checkpoint per stage: scd (argmin Metric 1 + Metric 2), cd (fixed order), td (one teacher: "
           "--td-ckpt)")
    a("--aw", action=argparse.BooleanOptionalAction, default=True,
      help="sample-wise adaptive weighting w = σ(log L_stuSFT − log L_ckpt); --no-aw uses --alpha")
    a("--alpha", type=float, default=0.5, help="KD weight without AW: α·KD + (1 − α)·CE")
    a("--loss", choices=sorted(DIVERGENCES), default="fkl", help="the KD divergence")
    a("--temperature", type=float, default=1.0, help="softmax temperature of the divergence")
    a("--beta", type=float, default=0.5, help="β of --loss jsd (0: forward KL, 1: reverse KL)")
    a("--lam", type=float, default=0.1, help="λ of --loss skew_fkl / skew_rkl")
    a("--taid-t-start", type=float, default=0.4, help="--loss taid: the interpolation weight t at the start (TAID's)")
    a("--taid-alpha", type=float, default=5e-4, help="--loss taid: α, the step of t's adaptive growth (TAID's)")
    a("--taid-beta", type=float, default=0.99, help="--loss taid: β, the momentum of the loss's relative change")
    a("--on-policy", type=float, default=0.0,
      help="λ of on-policy distillation (GKD): the probability that a step trains on the student's own sampled "
           "answers (temperature 1, the task's generation cap) instead of the gold ones; needs a live teacher "
           "and no AW (0 = off)")
    a("--stages", type=int, default=5, help="distillation stages; the teacher is re-chosen at each")
    a("--stage-steps", type=int, default=0,
      help="optimiser steps per stage; 0 = --epochs over the data, split evenly over the stages")
    a("--stage-epochs", type=float, default=0,
      help="passes over the training examples per stage (the paper: 2); 0 = --epochs split over the stages")
    a("--val-metric", action="store_true",
      help="after every stage, score the student on the validation split by the task metric and keep the best "
           "stage as best/ (the paper's checkpoint selection); the final evaluation then scores best/ too")
    a("--probe-size", type=int, default=schedule.PROBE_SIZE, help="training examples in SCD's probe set")
    a("--probe-cache", default="runs/probe_cache",
      help="dir of the teacher checkpoints' probe log-probs, shared by runs (keyed by content)")
    a("--teacher-sharding", choices=["shard", "replicate"], default="shard",
      help="under torchrun: shard each teacher checkpoint over the ranks like the student (FSDP2, 1/N of it per rank "
           "plus one layer at a time in its forward) or keep a whole copy on every rank (no communication; needs the "
           "memory). One process: ignored")
    a("--teacher-cache", default=None,
      help="dir from teacher_cache.py: KD, AW and SCD's probe read the teacher checkpoints' cached log-probs and no "
           "teacher model is loaded (refused if not made for this run's data, --max-len, --dtype and checkpoints)")
    a("--teacher", default="runs/teacher", help="teacher SFT run dir holding step_XXXXXX checkpoints")
    a("--td-ckpt", choices=["best", "final"], default="best", help="the teacher checkpoint TD uses")
    a("--distinct", action="store_true",
      help="never use one teacher checkpoint for two stages; refuses --stages above their number")
    a("--candidates", type=int, default=0,
      help="use N of the teacher run's checkpoints, placed by --candidate-spacing on that run (0 = all; the "
           "granularity sweep, from one teacher run)")
    a("--candidate-spacing", choices=["even", "geometric"], default="even",
      help="where --candidates N lie: even (k/N of the final step) or geometric (footsteps.geometric_steps); the "
           "nearest saved checkpoint to each")
    schedule.add_balance_args(p)
    a("--forward-only", action="store_true",
      help="SCD never chooses a checkpoint earlier than the last stage's (not in the paper)")
    a("--aw-anchor", choices=["sft", "current"], default="sft",
      help="AW's reference loss: sft (the paper: the frozen SFT student's L_stuSFT) or current (the student's own "
           "per-sample loss, rescored at every stage start)")
    a("--sides", default=None,
      help="weights.py's sfs_tfs.json: after every stage, log the student's mean answer loss on its SFS and TFS "
           "examples (the final teacher's split) to metrics.jsonl")
    a("--student-sft", default="runs/student",
      help="the frozen SFT student of AW's L_stuSFT: its SFT run dir (the final checkpoint), a model dir or a "
           "Hugging Face id")
    a("--init", default="models/student",
      help="model dir (or Hugging Face id, owner/name[@revision]) the distilled student starts from")
    a("--aw-table", default="runs/aw/losses.safetensors",
      help="L_stuSFT table from weights.py; used only if made from these examples, tokenizer, SFT student weights, "
           "--dtype and device kind, else L_stuSFT is computed here")
    a("--variant", default=None, help="run name (default from --schedule, --aw, --loss); --out defaults to "
                                      "runs/distill/<variant>")
    a("--save-every", type=int, default=0,
      help="optimiser steps between resume states inside a stage (0 = at stage ends only)")
    a("--eval-split", choices=["test", "val", "none"], default="test", help="final evaluation split")
    a("--eval-size", type=int, default=0, help="evaluate on the first N examples (0 = all)")
    a("--max-new-tokens", type=int, default=0,
      help="generation cap of the final evaluation and of --on-policy samples (0 = the task's own)")
    add_common_args(p)
    return p


def parse_args(argv=None):
    """The flags, resolved and checked: a flag this run would ignore, or a value out of range, is one error line."""
    p = flag_parser()
    args = p.parse_args(argv)
    given = runtime.given_flags(p, argv)
    runtime.refuse_unused(given, distill_unused(args))
    resolve_args(args, DEFAULTS, given)
    args.variant = args.variant or args.schedule + ("_aw" if args.aw else "") + (
        "" if args.loss == "fkl" else f"_{args.loss}")
    args.out = args.out or f"runs/distill/{args.variant}"
    for flag, ok in (("stages", args.stages >= 1), ("stage-steps", args.stage_steps >= 0),
                     ("stage-epochs", args.stage_epochs >= 0 and math.isfinite(args.stage_epochs)),
                     ("probe-size", args.probe_size >= 1), ("alpha", 0 <= args.alpha <= 1),
                     ("temperature", args.temperature > 0), ("beta", 0 <= args.beta <= 1),
                     ("lam", 0 <= args.lam <= 1), ("eval-size", args.eval_size >= 0),
                     ("taid-t-start", 0 <= args.taid_t_start < 1), ("taid-alpha", 0 <= args.taid_alpha <= 1),
                     ("taid-beta", 0 <= args.taid_beta <= 1), ("on-policy", 0 <= args.on_policy <= 1),
                     ("max-new-tokens", args.max_new_tokens >= 0), ("candidates", args.candidates >= 0),
                     ("metric2-weight", args.metric2_weight >= 0 and math.isfinite(args.metric2_weight))):
        if not ok:
            raise UserError(f"--{flag} {getattr(args, flag.replace('-', '_'))}: out of range (see --help)")
    return args



def main(argv=None):
    distill(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
