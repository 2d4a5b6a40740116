"""The staged distillation loop of SCD with AW, its baselines, and the divergences (arXiv 2601.10114, Sec. 3.2-3.3).

    python distill.py                                    # SCD + AW: runs/teacher checkpoints -> models/student
    python distill.py --schedule td --no-aw --alpha 1    # plain KD from the best teacher checkpoint
    python distill.py --schedule cd --loss jsd --beta 0.1
    python distill.py --teacher-cache runs/teacher_cache  # from teacher_cache.py's log-probs: no teacher forward

The run has --stages stages. At each stage start the scheduler (schedule.py) picks a teacher checkpoint, which is
loaded in place of the previous one, and the optimiser and lr schedule start afresh. Each sample's loss is
w·KD + (1 − w)·CE_gold over its answer tokens, with w from AW (weights.py) or a fixed --alpha, summed and divided by
the answer-token count of the whole optimiser step. Output in runs/distill/<variant>/: stage_XX/ and final/ (HF
layout), schedule.jsonl (one line per teacher choice), metrics.jsonl, config.json, resume/ (for --resume) and the
final evaluation in final/eval_<task>_<split>.json. With --teacher-cache (teacher_cache.py) no teacher model is
loaded: the KD term, AW's L_ckpt and SCD's probe read the checkpoints' cached log-probs.

Beyond the paper, each off by default (issue #16): --candidates N walks N of the teacher run's checkpoints,
--metric-balance and --forward-only change how SCD chooses (schedule.py), --aw-anchor current replaces L_stuSFT by
the student's own loss at each stage start (stage_anchor), and --sides logs the student's loss on the SFS and TFS
examples after every stage.

Under `torchrun --nproc_per_node N` (runtime.py) the student is sharded with FSDP2, each teacher checkpoint is
sharded too (--teacher-sharding shard) or copied whole to every rank (replicate), and every rank follows rank 0's
SCD choice; the loss is divided by the answer tokens of the global batch, so the run is the one-process run with
N times the batch. The resume state is sharded by rank (torch.distributed.checkpoint).

Divergences take answer-position logits (N, V) of the student and the teacher and return one value per token (N,),
so the caller can weight each sample. They work in fp32 log-space: probabilities only ever multiply a difference of
log_softmax outputs, and a zero probability contributes 0, so there is no 0 * log 0, even for -inf logits. `chunked`
runs them a slice of tokens at a time under activation checkpointing, so their (N, V) temporaries exist for one
slice only, and `token_losses` applies the student's LM head inside the slice, so the student's (N, V) logits never
exist whole.
"""

import argparse
import gc
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import evaluate
import runtime
import schedule
import sft
import teacher_cache
import weights
from model import load_model, model_fingerprint
from runtime import UserError, read_json, run_cli

# lr and epochs as the student's SFT: the same data budget for every row of the comparison
DEFAULTS = {k: sft.ROLE_DEFAULTS["student"][k] for k in ("lr", "epochs")}
CHUNK_ELEMENTS = 1 << 24  # fp32 elements per (n, V) slice, 64 MiB: 341 tokens at vocab 49152, 130 at 128256

# -----------------------------------------------------------------------------
# divergences: logits (N, V) -> (N,), p = softmax(teacher / T), q = softmax(student / T)


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)  # skip a (N, V) pass at T=1


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row, from log-probabilities (N, V) -> (N,)."""
    p = logp.exp()
    # where p = 0 the term is 0, even when log p = -inf (a -inf logit); masking the difference rather than the
    # product keeps 0 * inf out of the backward pass too
    return (p * torch.where(p > 0, logp - logq, 0.0)).sum(-1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, a: float) -> torch.Tensor:
    """log(a·p + (1 − a)·q) by logsumexp, exact at a = 0 and a = 1 (where a log-weight would be -inf)."""
    if a <= 0:
        return logq
    if a >= 1:
        return logp
    return torch.logaddexp(logp + math.log(a), logq + math.log1p(-a))


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p ‖ q) = Σ_v p_v (log p_v − log q_v): mode-covering, the classic KD loss (no T² factor)."""
    return kl_rows(log_probs(teacher, temperature), log_probs(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(q ‖ p) = Σ_v q_v (log q_v − log p_v): mode-seeking (MiniLLM)."""
    return kl_rows(log_probs(student, temperature), log_probs(teacher, temperature))


def jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), with m = β·p + (1 − β)·q:

        JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m),   log m = logsumexp(log β + log p, log(1 − β) + log q).

    JSD(β) itself vanishes at both ends; what it approaches there, after dividing by its weight, is used instead:
    β = 0 gives forward KL(p ‖ q) = lim JSD(β)/β, β = 1 gives reverse KL(q ‖ p) = lim JSD(β)/(1 − β).
    """
    logp, logq = log_probs(teacher, temperature), log_probs(student, temperature)
    if beta <= 0:
        return kl_rows(logp, logq)
    if beta >= 1:
        return kl_rows(logq, logp)
    logm = log_mix(logp, logq, beta)
    return beta * kl_rows(logp, logm) + (1 - beta) * kl_rows(logq, logm)


def skew_forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    lam: float = 0.1) -> torch.Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p ‖ λ·p + (1 − λ)·q); λ = 0 is forward KL."""
    logp, logq = log_probs(teacher, temperature), log_probs(student, temperature)
    return kl_rows(logp, log_mix(logp, logq, lam))


def skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    lam: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ λ·q + (1 − λ)·p); λ = 0 is reverse KL."""
    logp, logq = log_probs(teacher, temperature), log_probs(student, temperature)
    return kl_rows(logq, log_mix(logq, logp, lam))


def tvd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ½·Σ_v |p_v − q_v|, in [0, 1]."""
    return 0.5 * (log_probs(teacher, temperature).exp() - log_probs(student, temperature).exp()).abs().sum(-1)


DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "skew_fkl": skew_forward_kl,
               "skew_rkl": skew_reverse_kl, "tvd": tvd}


# -----------------------------------------------------------------------------
# a top-k teacher: the divergences on k + 1 buckets


def bucket_log_probs(logq: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Collapse log-probs (n, V) into k + 1 buckets (n, k + 1): the tokens `indices` (n, k), then one bucket for all
    the others, log Σ_{v ∉ top-k} q_v (computed from their own log-probs, not as 1 − Σ top-k). With k = V there is
    nothing left and no tail bucket."""
    top = logq.gather(-1, indices)
    if indices.shape[-1] >= logq.shape[-1]:
        return top
    rest = logq.scatter(-1, indices, float("-inf"))
    return torch.cat([top, torch.logsumexp(rest, -1, keepdim=True)], -1)


def teacher_buckets(values: torch.Tensor, tail: torch.Tensor, vocab_size: int, temperature: float = 1.0):
    """The cached top-k teacher as k + 1 bucket log-probs at temperature T: softmax over

        log p_v / T  for the k kept tokens,   log(V − k) + (log m − log(V − k)) / T  for the tail of mass m.

    The tail's own log-probs were not kept, so it is tempered as if its mass were spread evenly over its V − k
    tokens: exact at T = 1 (the buckets are then p itself, renormalised after the on-disk rounding), exact for a
    one-token tail (k = V − 1) and with no tail (k = V); otherwise an approximation, which flattens (T > 1) or
    sharpens (T < 1) the tail less than the real tail would be."""
    logits = values.float() / temperature
    k = values.shape[-1]
    if k < vocab_size:
        log_n = math.log(vocab_size - k)
        logits = torch.cat([logits, (log_n + (tail.float() - log_n) / temperature)[:, None]], -1)
    return F.log_softmax(logits, -1)


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy −log softmax(logits)[label] per token (N,); label -100 gives 0."""
    return F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100)

# -----------------------------------------------------------------------------
# chunking over tokens


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def chunked(fn, *xs: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """Apply fn (row slices of xs -> tuple of (n,) tensors) `rows` rows at a time and concatenate the results.

    With autograd on, each slice runs under torch.utils.checkpoint: forward keeps only fn's inputs and outputs, and
    backward recomputes one slice's (n, V) temporaries at a time. So they exist for one slice, not for all N rows,
    at the price of running fn twice. Up to `rows` tokens (the usual training batch: answers are short) run as one
    piece with no recomputation; an empty batch too, so it stays in the graph and sums to 0, not NaN.
    """
    n = xs[0].shape[0]
    if n <= rows:
        return fn(*xs)
    grad = torch.is_grad_enabled()
    parts = []
    for i in range(0, n, rows):
        piece = [x[i:i + rows] for x in xs]
        parts.append(checkpoint(fn, *piece, use_reentrant=False) if grad else fn(*piece))
    return tuple(torch.cat(p) for p in zip(*parts))


def token_losses(h: torch.Tensor, head, teacher, labels: torch.Tensor, loss: str = "fkl",
                 temperature: float = 1.0, rows: int | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer token: the divergence of the student from the teacher, and the student's gold CE; (N,) each.

    h (N, D) are the student's hidden states at answer positions and head(h) its fp32 logits (pass
    head=lambda x: x to give logits directly). head runs inside each slice, so the student's (N, V) logits are never
    built whole. The CE is at temperature 1, the divergence at `temperature`; `params` go to the divergence (beta
    for jsd, lam for the skew KLs). The teacher carries no gradient and is either

    - (N, V) logits, or log-probs (the exact teacher cache: log_softmax(log p / T) = log_softmax(logits / T)), or
    - a teacher_cache.TopK: then both distributions are collapsed into the same k + 1 buckets, the teacher's k
      tokens and one tail bucket (bucket_log_probs on the student's exact tempered log-probs, teacher_buckets on the
      teacher's), and the divergence is taken between the buckets (at T = 1: they are already tempered, and
      log_softmax of normalised log-probs changes nothing). Every divergence here is an f-divergence, so by the
      data-processing inequality the bucketed value is a lower bound of the full one (for forward KL: the mass the
      student puts on the wrong tail tokens is not penalised); it is exact when the tail is one token or empty.
    """
    divergence = DIVERGENCES[loss]
    if isinstance(teacher, teacher_cache.TopK):
        def slice_buckets(h, values, indices, tail, y):
            s = head(h)  # (n, V) fp32
            logq = bucket_log_probs(log_probs(s, temperature), indices)  # (n, k + 1)
            logp = teacher_buckets(values, tail, s.shape[-1], temperature)
            return divergence(logq, logp, 1.0, **params), per_token_ce(s, y)

        return chunked(slice_buckets, h, teacher.values, teacher.indices, teacher.tail, labels,
                       rows=rows or chunk_rows(teacher.vocab_size))

    def slice_losses(h, t, y):
        s = head(h)  # (n, V) fp32
        return divergence(s, t, temperature, **params), per_token_ce(s, y)

    return chunked(slice_losses, h, teacher.detach(), labels, rows=rows or chunk_rows(teacher.shape[-1]))


def objective_sum(kd: torch.Tensor, ce: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j·KD_j + (1 − w_j)·CE_j over answer tokens j, w_j being the weight of token j's sample (AW) or α.
    The caller divides by the answer-token count of the whole accumulated batch."""
    return (w * kd + (1 - w) * ce).sum()

# -----------------------------------------------------------------------------
# one optimiser step


def student_losses_for(items: list[dict], paths, key: dict) -> tuple[torch.Tensor | None, list[str]]:
    """L_stuSFT of each item from the first loss table in `paths` made under `key` (weights.table_key) from these
    very examples, or None; and why each table that exists was passed over."""
    why = []
    for path in paths:
        if not Path(path).is_file():
            why.append(f"{path}: not found")
            continue
        ids, columns, meta = weights.load_losses(path)
        reason = "it has no L_stuSFT column" if weights.STUDENT not in columns else \
            weights.table_mismatch(meta, ids, items, key)
        if reason is None:
            row = {i: k for k, i in enumerate(ids)}
            return columns[weights.STUDENT][[row[it["id"]] for it in items]], why
        why.append(f"{path}: {reason}")
    return None, why


def student_sft_lookup(args, items: list[dict], tok, student_sft: Path, out: Path, device):
    """ids -> L_stuSFT (B,): from weights.py's table when it matches this run, else scored here once (and kept in
    out/aw_losses.safetensors for a resume)."""
    key = weights.table_key(args.task, args.max_len, args.dtype, device, tok.files, student_sft)
    own = out / "aw_losses.safetensors"
    losses, why = student_losses_for(items, [args.aw_table, own], key)
    if losses is None and runtime.is_main():  # under torchrun rank 0 scores, the others read its table
        print(f"--aw-table {args.aw_table} does not match this run ({'; '.join(why)}): "
              f"scoring the SFT student {student_sft}")
        model = load_model(student_sft, device=device)
        losses = weights.sample_losses(model, items, tok.pad_id, args.eval_batch_size, device, args.dtype,
                                       "L_stuSFT")
        del model
        weights.save_losses(own, [it["id"] for it in items], {weights.STUDENT: losses},
                            {**key, "item_digests": [weights.item_digest(it) for it in items]})
    runtime.barrier()
    if losses is None:
        losses, _ = student_losses_for(items, [own], key)
    by_id = dict(zip((it["id"] for it in items), losses.tolist()))
    return lambda ids: torch.tensor([by_id[i] for i in ids])


@torch.no_grad()
def teacher_targets(teacher, batch: dict, device, dtype: str, gold_ce: bool):
    """The teacher at a micro-batch's N answer positions: (target, CE (N,) of its gold tokens or None), target being
    (N, V) logits, (N, V) log-probs or a TopK. `teacher` is a model, run here, or a teacher_cache.CachedTeacher."""
    if isinstance(teacher, teacher_cache.CachedTeacher):
        target, gold_logp = teacher.targets(batch, device)
        return target, -gold_logp
    with runtime.autocast(device, dtype):
        logits, labels, _ = sft.answer_logits(teacher, batch)  # (N, V), (N,)
    if not gold_ce:
        return logits, None
    ce, = chunked(lambda t, y: (per_token_ce(t, y),), logits, labels, rows=chunk_rows(logits.shape[-1]))
    return logits, ce


def distill_step(student, teacher, micro_batches, loss_student_sft, args, device) -> dict:
    """Gradients of one optimiser step: Σ_j w·KD_j + (1 − w)·CE_j over the micro-batches' answer tokens, divided
    by their global count. Per sample, w = aw_weight(L_stuSFT, L_ckpt) with L_ckpt the token-mean CE of the very
    teacher the KD term uses (AW), or w = --alpha. Returns token means of loss, KD and CE, and the mean w.

    teacher is the teacher model or its cached values (teacher_cache.CachedTeacher: the same numbers, no forward).
    loss_student_sft maps example ids to L_stuSFT ((B,) tensor), or is None without AW.
    """
    # the answer tokens of the whole step, over micro-batches and ranks: accumulation- and rank-invariant
    n_tokens = runtime.sum_int(sum(sft.n_answer_tokens(b) for b in micro_batches))
    params = {"jsd": {"beta": args.beta}, "skew_fkl": {"lam": args.lam}, "skew_rkl": {"lam": args.lam}}
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "w": 0.0}
    n_samples = 0
    for batch in micro_batches:
        batch = sft.to_device(batch, device)
        if not batch["ids"]:  # this rank's empty share of a short last batch (sft.rank_batch): FSDP still needs
            if isinstance(teacher, torch.nn.Module) and runtime.is_sharded(teacher):  # the forwards of the others,
                teacher_targets(teacher, batch, device, args.dtype, False)             # teacher's included; no
            with sft.autocast(device, args.dtype):                                     # answer tokens: it adds 0
                (sft.sft_loss_sum(student, batch) * 0).backward()
            continue
        B = batch["input_ids"].shape[0]
        target, ce_teacher = teacher_targets(teacher, batch, device, args.dtype, loss_student_sft is not None)
        with runtime.autocast(device, args.dtype):
            h, labels, rows = sft.answer_hidden(student, batch)  # (N, D)
        if loss_student_sft is None:
            w = torch.full((B,), args.alpha, device=device)
        else:
            w = weights.aw_weight(loss_student_sft(batch["ids"]).to(device),
                                  weights.sample_mean(ce_teacher, rows, B))  # (B,)
        with runtime.autocast(device, args.dtype):
            kd, ce = token_losses(h, student.lm_logits, target, labels, args.loss, args.temperature,
                                  **params.get(args.loss, {}))
            loss = objective_sum(kd, ce, w[rows]) / max(n_tokens, 1)
        loss.backward()
        sums["loss"] += float(loss.detach())
        sums["kd"] += float(kd.detach().sum()) / max(n_tokens, 1)
        sums["ce"] += float(ce.detach().sum()) / max(n_tokens, 1)
        sums["w"] += float(w.sum())
        n_samples += B
    sums = {k: runtime.sum_float(v) for k, v in sums.items()}  # each rank's share of the global means
    sums["w"] /= max(runtime.sum_int(n_samples), 1)
    sums["grad_norm"] = runtime.grad_norm_value(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0))
    return sums

# -----------------------------------------------------------------------------
# run directory: stage exports and resume state


def export_model(out: Path, name: str, step: int, model, tok, meta: dict, max_shard_gb: float) -> Path:
    """out/<name>/ in HF layout, written whole or not at all (it replaces a copy left by an interrupted run)."""
    return sft.save_checkpoint(out, step, model, tok, meta, name=name, max_shard_bytes=int(max_shard_gb * 2**30))


def save_resume_state(out: Path, step: int, model, tok, meta: dict, progress: dict, optimizer=None):
    """out/resume/step_XXXXXX/ with the student, optimizer (mid-stage only), RNG and loop position; the older
    states go once the new one is complete, so a kill at any moment leaves one to resume from."""
    sft.save_checkpoint(out / "resume", step, model, tok, meta, train_state=progress, optimizer=optimizer)
    if runtime.is_main():
        for s, path in sft.list_checkpoints(out / "resume"):
            if s < step:
                shutil.rmtree(path)
    runtime.barrier()


def check_inputs(args, checkpoints: dict) -> Path | None:
    """Refuse, before any heavy work, teacher checkpoints and students that do not share one vocabulary."""
    named = {f"--teacher {args.teacher}/{sft.checkpoint_name(s)}": p for s, p in checkpoints.items()}
    named[f"--init {args.init}"] = Path(args.init)
    student_sft = None
    if args.aw and args.aw_anchor == "sft":
        student_sft = weights.student_sft_checkpoint(args.student_sft)
        named[f"--student-sft {student_sft}"] = student_sft
    schedule.check_same_vocab(named)
    return student_sft

# -----------------------------------------------------------------------------


def used_checkpoints(schedule_log: Path) -> list[int]:
    """Teacher checkpoints earlier stages chose (schedule.jsonl), for --distinct across a resume."""
    if not schedule_log.exists():
        return []
    return [json.loads(line)["chosen"] for line in schedule_log.read_text().splitlines() if line.strip()]


def candidate_checkpoints(args, index: dict, checkpoints: dict) -> tuple[dict, dict]:
    """The teacher checkpoints this run may use: all of them, or --candidates N of them placed by
    --candidate-spacing on the same run (sft.subset_steps). SCD's Metric 1 still measures from the run's best
    checkpoint, which stays loadable even when it is not a candidate. Returns (index, {step: path})."""
    if not args.candidates:
        return index, checkpoints
    steps = sft.subset_steps(index["steps"], args.candidates, args.candidate_spacing)
    keep = sorted({*steps, index["best"]})
    return {**index, "steps": steps}, {s: checkpoints[s] for s in keep}


def stage_anchor(out: Path, stage: int, student, items: list[dict], tok, args, device):
    """Dynamic AW (--aw-anchor current, not in the paper): the anchor of AW's w = σ(log L_anchor − log L_ckpt) is
    the current student's own per-sample loss at the start of this stage, in place of the frozen SFT student's
    L_stuSFT. Scored once per stage and kept in out/aw_anchor/stage_XX.safetensors, so a resumed stage reads the
    very values it used (the file of stage s + 1 is written at the end of stage s, from the same weights)."""
    path = out / "aw_anchor" / f"stage_{stage:02d}.safetensors"
    if runtime.broadcast_object(path.exists()):  # one decision for all ranks: scoring runs the sharded student
        ids, columns, _ = weights.load_losses(path)
        losses = columns["anchor"]
    else:
        losses = weights.sample_losses(student, items, tok.pad_id, args.eval_batch_size, device, args.dtype,
                                       f"AW anchor, stage {stage}")
        ids = [it["id"] for it in items]
        runtime.main_first(weights.save_losses, path, ids, {"anchor": losses}, {"stage": stage})
    by_id = dict(zip(ids, losses.tolist()))
    return lambda batch_ids: torch.tensor([by_id[i] for i in batch_ids])


def read_sides(path, items: list[dict]) -> dict[str, list[str]]:
    """SFS and TFS ids of weights.py's sfs_tfs.json (the final teacher's split, as experiment.py uses), refused when
    it names examples this run does not train on."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--sides {path}: not found; weights.py writes sfs_tfs.json")
    try:
        split = weights.final_split(read_json(path))
        sides = {"sfs": list(split["sfs_ids"]), "tfs": list(split["tfs_ids"])}
    except (KeyError, TypeError, StopIteration, ValueError, AttributeError):
        raise UserError(f"--sides {path}: not an sfs_tfs.json written by weights.py") from None
    known = {it["id"] for it in items}
    missing = [i for ids in sides.values() for i in ids if i not in known]
    if missing:
        raise UserError(f"--sides {path}: example {missing[0]!r} is not in this run's training examples; "
                        "make the file with the same --task, --data and --train-size")
    return sides


def side_means(losses: torch.Tensor, items: list[dict], sides: dict[str, list[str]]) -> dict:
    """The student's mean answer loss (mean over examples of the token-mean CE) on the SFS and on the TFS examples."""
    row = {it["id"]: k for k, it in enumerate(items)}
    return {f"{side}_loss": float(losses[[row[i] for i in ids]].mean()) if ids else None
            for side, ids in sides.items()}


def unused_flags(args) -> dict[str, str]:
    """The flags this run would ignore, each with what to do instead (runtime.refuse_unused refuses those given)."""
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
    if args.stage_steps:
        why = "--stage-steps sets the length of every stage; drop one of them"
        unused.update(epochs=why, max_steps=why)
    if args.eval_split == "none":
        why = "there is no final evaluation with --eval-split none"
        unused.update(eval_size=why, max_new_tokens=why)
    return unused


def variant_name(args) -> str:
    return args.schedule + ("_aw" if args.aw else "") + ("" if args.loss == "fkl" else f"_{args.loss}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schedule", choices=schedule.SCHEDULES, default="scd",
                   help="teacher checkpoint per stage: scd (argmin Metric 1 + Metric 2), cd (fixed order), "
                        "td (one teacher: --td-ckpt)")
    p.add_argument("--aw", action=argparse.BooleanOptionalAction, default=True,
                   help="sample-wise adaptive weighting w = σ(log L_stuSFT − log L_ckpt); --no-aw uses --alpha")
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight without AW: α·KD + (1 − α)·CE")
    p.add_argument("--loss", choices=sorted(DIVERGENCES), default="fkl", help="the KD divergence")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the divergence")
    p.add_argument("--beta", type=float, default=0.5, help="β of --loss jsd (0: forward KL, 1: reverse KL)")
    p.add_argument("--lam", type=float, default=0.1, help="λ of --loss skew_fkl / skew_rkl")
    p.add_argument("--stages", type=int, default=5, help="distillation stages; the teacher is re-chosen at each")
    p.add_argument("--stage-steps", type=int, default=0,
                   help="optimiser steps per stage; 0 = --epochs over the data, split evenly over the stages")
    p.add_argument("--probe-size", type=int, default=32, help="training examples in SCD's probe set")
    p.add_argument("--probe-cache", default="runs/probe_cache",
                   help="dir of the teacher checkpoints' probe log-probs, shared by runs (keyed by content)")
    p.add_argument("--teacher-sharding", choices=["shard", "replicate"], default="shard",
                   help="under torchrun: shard each teacher checkpoint over the ranks like the student (FSDP2, 1/N "
                        "of it per rank plus one layer at a time in its forward) or keep a whole copy on every rank "
                        "(no communication; needs the memory). One process: ignored")
    p.add_argument("--teacher-cache", default=None,
                   help="dir from teacher_cache.py: KD, AW and SCD's probe read the teacher checkpoints' cached "
                        "log-probs and no teacher model is loaded (refused if not made for this run's data, "
                        "--max-len, --dtype and checkpoints)")
    p.add_argument("--teacher", default="runs/teacher", help="teacher SFT run dir holding step_XXXXXX checkpoints")
    p.add_argument("--td-ckpt", choices=["best", "final"], default="best", help="the teacher checkpoint TD uses")
    p.add_argument("--distinct", action="store_true",
                   help="never use one teacher checkpoint for two stages; refuses --stages above their number")
    p.add_argument("--candidates", type=int, default=0,
                   help="use N of the teacher run's checkpoints, placed by --candidate-spacing on that run "
                        "(0 = all; the granularity sweep, from one teacher run)")
    p.add_argument("--candidate-spacing", choices=["even", "geometric"], default="even",
                   help="where --candidates N lie: even (k/N of the final step) or geometric (sft.geometric_steps)"
                        "; the nearest saved checkpoint to each")
    schedule.add_balance_args(p)
    p.add_argument("--forward-only", action="store_true",
                   help="SCD never chooses a checkpoint earlier than the last stage's (not in the paper)")
    p.add_argument("--aw-anchor", choices=["sft", "current"], default="sft",
                   help="AW's reference loss: sft (the paper: the frozen SFT student's L_stuSFT) or current (the "
                        "student's own per-sample loss, rescored at every stage start)")
    p.add_argument("--sides", default=None,
                   help="weights.py's sfs_tfs.json: after every stage, log the student's mean answer loss on its SFS "
                        "and TFS examples (the final teacher's split) to metrics.jsonl")
    p.add_argument("--student-sft", default="runs/student", help="student SFT run dir: its final checkpoint is "
                                                                 "the frozen L_stuSFT of AW")
    p.add_argument("--init", default="models/student", help="model dir the distilled student starts from")
    p.add_argument("--aw-table", default="runs/aw/losses.safetensors",
                   help="L_stuSFT table from weights.py; used only if made from these examples, tokenizer, SFT "
                        "student weights, --dtype and device kind, else L_stuSFT is computed here")
    p.add_argument("--variant", default=None, help="run name (default from --schedule, --aw, --loss); "
                                                   "--out defaults to runs/distill/<variant>")
    p.add_argument("--save-every", type=int, default=0,
                   help="optimiser steps between resume states inside a stage (0 = at stage ends only)")
    p.add_argument("--eval-split", choices=["test", "val", "none"], default="test", help="final evaluation split")
    p.add_argument("--eval-size", type=int, default=0, help="evaluate on the first N examples (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="generation cap of the final evaluation (0 = the task's own)")
    sft.add_common_args(p)
    args = p.parse_args(argv)
    runtime.refuse_unused(runtime.given_flags(p, argv), unused_flags(args))
    sft.resolve_args(args, DEFAULTS)
    args.variant = args.variant or variant_name(args)
    args.out = args.out or f"runs/distill/{args.variant}"
    for flag, ok in (("stages", args.stages >= 1), ("stage-steps", args.stage_steps >= 0),
                     ("probe-size", args.probe_size >= 1), ("alpha", 0 <= args.alpha <= 1),
                     ("temperature", args.temperature > 0), ("beta", 0 <= args.beta <= 1),
                     ("lam", 0 <= args.lam <= 1), ("eval-size", args.eval_size >= 0),
                     ("max-new-tokens", args.max_new_tokens >= 0), ("candidates", args.candidates >= 0),
                     ("metric2-weight", args.metric2_weight >= 0 and math.isfinite(args.metric2_weight))):
        if not ok:
            raise UserError(f"--{flag} {getattr(args, flag.replace('-', '_'))}: out of range (see --help)")
    distill(args)


def distill(args) -> Path:
    """The staged loop, top to bottom. Returns out/final."""
    device = runtime.resolve_device(args.device)
    runtime.init_distributed(device)  # torchrun: one process per rank; without it, nothing
    args.dtype = runtime.resolve_dtype(args.dtype, device)
    world = runtime.world()
    index = sft.read_checkpoint_index(args.teacher)  # refuses a run dir without complete checkpoints
    index, checkpoints = candidate_checkpoints(args, index, dict(sft.list_checkpoints(args.teacher)))
    n_usable = 1 if args.schedule == "td" else len(index["steps"])
    if args.distinct and args.stages > n_usable:
        raise UserError(f"--stages {args.stages} with --distinct: {args.schedule.upper()} has {n_usable} teacher "
                        f"checkpoint(s) in {args.teacher} and none may serve two stages")
    student_sft = check_inputs(args, checkpoints)
    runtime.seed_everything(args.seed)
    tok = data.load_tokenizer(args.init)
    train_examples, train_items = sft.load_split(tok, args, "train", args.train_size)
    _, val_items = sft.load_split(tok, args, "val", args.val_size)
    if not train_items:
        raise UserError(f"task {args.task}: the training split is empty")
    data.check_generation_flag(args.task, train_examples, "--max-new-tokens", args.max_new_tokens)
    sides = read_sides(args.sides, train_items) if args.sides else None
    probe = schedule.probe_items(train_items, args.probe_size, args.seed)
    cached = None
    if args.teacher_cache:  # only the checkpoints this schedule can choose need to be in it
        cached = teacher_cache.TeacherCache(args.teacher_cache)
        usable = [schedule.td_choice(index, args.td_ckpt == "final")] if args.schedule == "td" else index["steps"]
        cached.check(teacher_cache.cache_key(train_items, {s: checkpoints[s] for s in usable}, args.max_len,
                                             args.dtype, device.type), probe if args.schedule == "scd" else ())
    # the content of every input, so --resume refuses a retrained teacher or an edited data file by name
    inputs = {"train": sft.items_fingerprint(train_items), "val": sft.items_fingerprint(val_items),
              "init": model_fingerprint(args.init), "teacher": {str(s): model_fingerprint(p) for s, p in
                                                                checkpoints.items()},
              "student_sft": model_fingerprint(student_sft) if student_sft else None}
    config = {**vars(args), "device": str(device), "world": world, "inputs": inputs}
    # only once all inputs are good; --save-every places resume states only, the run is bit-identical without
    out = runtime.main_first(sft.prepare_out_dir, args.out, config, args.resume, args.overwrite,
                             sft.RESUME_FREE + ("save_every",))
    global_batch = args.batch_size * world  # --batch-size is per rank
    steps_per_epoch = len(sft.build_batches(train_items, global_batch, args.grad_accum, args.seed, 0))
    total = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps:
        total = min(total, args.max_steps)
    stage_steps = args.stage_steps or math.ceil(total / args.stages)
    warmup = int(args.warmup * stage_steps)
    n_steps = args.stages * stage_steps

    loss_student_sft, anchor_stage = None, None
    if args.aw and args.aw_anchor == "sft":
        loss_student_sft = student_sft_lookup(args, train_items, tok, student_sft, out, device)
    cache = None
    if args.schedule == "scd" and cached is not None:
        cache = cached.probe(probe)
    elif args.schedule == "scd":
        cache = schedule.ProbeCache(args.probe_cache, probe, list(checkpoints.items()), args.dtype, device, tok.files)
        # rank 0 scores the checkpoints, then every rank reads the files (`and None`: the cache is not sent round)
        runtime.main_first(lambda: cache.build(tok.pad_id, args.eval_batch_size) and None)

    stage, k, chosen, tokens_seen, resume_from = 0, 0, None, 0, None
    teacher, teacher_step = None, None
    log, sched_log = sft.MetricsLog(out / "metrics.jsonl"), sft.MetricsLog(out / "schedule.jsonl")
    if args.resume:
        found = sft.latest_resumable(out / "resume")
        if found is None:
            raise UserError(f"--resume: {out} has no complete resume state yet; start over with --overwrite")
        resume_from = found[1]
        student = load_model(resume_from, device=device)
        progress = read_json(resume_from / sft.STATE_FILES[1])
        stage, k, chosen, tokens_seen = (progress[x] for x in ("stage", "k", "chosen", "tokens_seen"))
        g = stage * stage_steps + k
        log.truncate_after(g)
        sched_log.truncate_after(g if chosen is not None else g - 1)
        runtime.print0(f"resuming from {resume_from}: stage {stage}, step {g} of {n_steps}")
    else:
        student = load_model(args.init, device=device)
    student.set_activation_checkpointing(args.activation_checkpointing)
    student = runtime.shard(student, device, args.dtype)
    if resume_from is not None and k == 0:  # a stage boundary: weights and RNG, the next stage's optimiser is new
        sft.load_resume_state(resume_from, student)
        resume_from = None
    scheduler = schedule.Scheduler(args.schedule, index, args.stages, cache, final=args.td_ckpt == "final",
                                   distinct=args.distinct, used=used_checkpoints(out / "schedule.jsonl"),
                                   balance=args.metric_balance, metric2_weight=args.metric2_weight,
                                   forward_only=args.forward_only)

    runtime.print0(f"distill {args.variant}: {args.schedule.upper()}"
                   f"{' + AW' if args.aw else f', alpha {args.alpha}'}, {args.loss} at T={args.temperature}; "
                   f"{len(index['steps'])} teacher checkpoints (best {index['best']}"
                   f"{', from the cache ' + cached.describe() if cached is not None else ''}), "
                   f"{args.stages} stages x {stage_steps} steps ({steps_per_epoch}/epoch, batch {args.batch_size}x"
                   f"{args.grad_accum}{f'x{world} ranks' if world > 1 else ''}), {len(train_items)} train examples, "
                   f"{student.num_params() / 1e6:.1f}M-param student on {device} -> {out}")
    bar = tqdm(total=n_steps, initial=stage * stage_steps + k, desc=f"distill {args.variant}", dynamic_ncols=True,
               disable=not runtime.is_main())
    while stage < args.stages:
        g = stage * stage_steps + k
        if chosen is None:
            chosen, record = scheduler.select(stage, g, lambda: schedule.probe_logprobs(
                student, probe, tok.pad_id, args.eval_batch_size, device, args.dtype))
            chosen, record = runtime.broadcast_object((chosen, record))  # every rank follows rank 0's choice
            scheduler.follow(chosen)
            sched_log.log(record)
            runtime.print0(f"stage {stage}: teacher checkpoint {chosen}")
        if args.aw and args.aw_anchor == "current" and anchor_stage != stage:
            loss_student_sft, anchor_stage = stage_anchor(out, stage, student, train_items, tok, args, device), stage
        if chosen != teacher_step:  # only one teacher checkpoint in memory at a time: drop the old one first
            teacher = None
            gc.collect()  # FSDP's hooks hold the old teacher in a reference cycle: free it before the next loads
            if cached is not None:
                teacher = cached.checkpoint(chosen)
            else:
                # under torchrun with --dtype bf16 the teacher is kept in bf16 (it only runs forward, and FSDP
                # computes in bf16 anyway); one process keeps fp32 weights under autocast, as before
                dtype = torch.bfloat16 if world > 1 and args.dtype == "bf16" else torch.float32
                teacher = load_model(checkpoints[chosen], device=device, dtype=dtype).requires_grad_(False).eval()
                if args.teacher_sharding == "shard":  # 1/N of it per rank, one layer gathered at a time
                    teacher = runtime.shard(teacher, device, args.dtype, train=False)
            teacher_step = chosen
        optimizer = sft.make_optimizer(student, args.lr, args.weight_decay)  # fresh at every stage
        if resume_from is not None:  # mid-stage: the optimiser's state too
            sft.load_resume_state(resume_from, student, optimizer)
            resume_from = None
        student.train()
        t_log, tok_log = time.perf_counter(), 0
        while k < stage_steps:
            epoch, j = divmod(g, steps_per_epoch)
            micro = [sft.rank_batch(train_items, mb, tok.pad_id)
                     for mb in sft.build_batches(train_items, global_batch, args.grad_accum, args.seed, epoch)[j]]
            lr = sft.lr_at(k, stage_steps, warmup, args.lr)
            stats = distill_step(student, teacher, micro, loss_student_sft, args, device)
            sft.apply_update(optimizer, lr, g, stats["loss"], stats["grad_norm"])
            k, g = k + 1, g + 1
            batch_tokens = runtime.sum_int(sum(int(b["attention_mask"].sum()) for b in micro if b["ids"]))
            tokens_seen, tok_log = tokens_seen + batch_tokens, tok_log + batch_tokens
            bar.update(1)
            if g % args.log_every == 0 or k == stage_steps:
                row = {"step": g, "stage": stage, "ckpt": chosen, **stats, "lr": lr, "tokens_seen": tokens_seen,
                       "tok_per_s": tok_log / (time.perf_counter() - t_log)}
                log.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", w=f"{row['w']:.2f}", ckpt=chosen, lr=f"{lr:.1e}",
                                tok_s=f"{row['tok_per_s']:.0f}")
                t_log, tok_log = time.perf_counter(), 0
            if args.save_every and k % args.save_every == 0 and k < stage_steps:
                save_resume_state(out, g, student, tok, {"step": g, "stage": stage, "ckpt": chosen},
                                  {"stage": stage, "k": k, "chosen": chosen, "tokens_seen": tokens_seen}, optimizer)
        del optimizer
        val_loss = sft.eval_loss(student, val_items, tok.pad_id, args.eval_batch_size, device, args.dtype) \
            if val_items else None
        row = {"step": g, "stage": stage, "eval": True, "val_loss": val_loss}
        if sides or (args.aw and args.aw_anchor == "current" and stage + 1 < args.stages):
            # one pass over the training examples: the SFS/TFS losses, and the next stage's AW anchor
            losses = weights.sample_losses(student, train_items, tok.pad_id, args.eval_batch_size, device,
                                           args.dtype, "stage-end losses")
            if sides:
                row.update(side_means(losses, train_items, sides))
            if args.aw and args.aw_anchor == "current" and stage + 1 < args.stages:
                runtime.main_first(weights.save_losses, out / "aw_anchor" / f"stage_{stage + 1:02d}.safetensors",
                                   [it["id"] for it in train_items], {"anchor": losses}, {"stage": stage + 1})
        log.log(row)
        meta = {"step": g, "stage": stage, "ckpt": chosen, "val_loss": val_loss, "variant": args.variant,
                "config": config}
        export_model(out, f"stage_{stage:02d}", g, student, tok, meta, args.max_shard_gb)
        stage, k, chosen = stage + 1, 0, None
        save_resume_state(out, g, student, tok, meta, {"stage": stage, "k": 0, "chosen": None,
                                                      "tokens_seen": tokens_seen})
        runtime.print0(f"stage {stage - 1} done: val_loss {val_loss if val_loss is None else round(val_loss, 4)}"
                       f" -> {out / f'stage_{stage - 1:02d}'}")
    bar.close()

    final = export_model(out, "final", n_steps, student, tok, {"step": n_steps, "variant": args.variant,
                                                               "config": config}, args.max_shard_gb)
    files = (args.data or "").split(",") + [None] * 3
    data_file = files[{"val": 1, "test": 2}.get(args.eval_split, 0)] if args.task == "jsonl" else None
    if args.eval_split != "none" and (args.task != "jsonl" or data_file) and runtime.is_main():
        # rank 0 scores the exported model alone (a full copy, inference only); the others wait at the barrier
        metrics = evaluate.evaluate_dir(final, args.task, args.eval_split, args.data_dir, data_file,
                                        args.eval_size, args.eval_batch_size, args.max_new_tokens or None, device,
                                        args.dtype, progress=False, metric=args.metric)
        log.log({"step": n_steps, "final_eval": True, **metrics})
        print(f"final {args.task} {args.eval_split}: {metrics['main']:.4f} (n={metrics['n']}) -> "
              f"{final / f'eval_{args.task}_{args.eval_split}.json'}")
    runtime.barrier()
    runtime.print0(f"done: {out}/stage_00..stage_{args.stages - 1:02d}, {final}; schedule in "
                   f"{out / 'schedule.jsonl'}")
    return final


if __name__ == "__main__":
    run_cli(main)
