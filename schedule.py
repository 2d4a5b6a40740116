"""Which teacher checkpoint the student learns from, and when: SCD, and the CD and TD baselines (arXiv 2601.10114,
Sec. 3.2).

    python schedule.py --student models/student     # the SCD table for a student: why each checkpoint would win
    python schedule.py --teacher runs/teacher --metric1-only    # Metric 1 per checkpoint of any teacher run

SCD picks, at the start of every distillation stage, the teacher checkpoint c that minimises

    Metric 1 (c) + Metric 2 (c) = KL(p_best ‖ p_c) + KL(p_student ‖ p_c),

both token-means over the answer tokens of a fixed probe set drawn from the training split: a checkpoint close to
the best teacher (Metric 1) that the current student can still follow (Metric 2), so the student walks the teacher's
own convergence path. Beyond the paper (each off by default): --metric-balance puts the two metrics on
one scale before adding them (balance_metrics), and --forward-only never goes back to a checkpoint earlier than the
last stage's. CD walks the checkpoints in training order, evenly over the stages; TD always uses the best
(or the final) teacher.

The probe cache holds the answer-token log-probabilities (N, V) of every candidate checkpoint on the probe set, one
safetensors file each under a dir named by a hash of all they depend on (probe tokens, tokenizer, dtype, device
kind, the checkpoints' content). Each checkpoint's
forward runs once, ever; Metric 1 is then computed once per run, and each re-selection needs only the student's
forward on the probe set.
"""

import argparse
import hashlib
import json
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

import data
import runtime
from checkpoints import (checkpoint_name, files_fingerprint, items_fingerprint, list_checkpoints, model_fingerprint,
                         read_checkpoint_index)
from flags import add_scoring_args, resolve_scoring_args
from losses import mean_kl
from model import load_model
from runtime import UserError, read_json, run_cli, save_tensors
from train import answer_batches, load_split

SCHEDULES = ("scd", "cd", "td")
PROBE_SIZE = 32  # training examples in SCD's probe set, unless --probe-size says otherwise
BALANCES = ("none", "spread", "weight")  # how Metric 2 is weighed against Metric 1 (none: the paper's plain sum)

# -----------------------------------------------------------------------------
# the two metrics (log-probabilities (N, V) of the probe's answer tokens)


def metric1(best_logp: torch.Tensor, ckpt_logp: torch.Tensor) -> float:
    """Metric 1 = KL(p_best ‖ p_c), token-mean over the probe's answer tokens: how far checkpoint c is from the best
    teacher. It does not involve the student, so it is fixed for a run."""
    return mean_kl(best_logp, ckpt_logp)


def metric2(student_logp: torch.Tensor, ckpt_logp: torch.Tensor) -> float:
    """Metric 2 = KL(p_student ‖ p_c), token-mean over the probe's answer tokens: how far checkpoint c is from the
    student as it is now. Recomputed at every stage."""
    return mean_kl(student_logp, ckpt_logp)

# -----------------------------------------------------------------------------
# the schedulers


def scd_choice(m1: dict[int, float], m2: dict[int, float]) -> int:
    """SCD: argmin_c Metric 1 (c) + Metric 2 (c) over the candidates whose sum is finite; a tie goes to the earlier
    checkpoint. A NaN would compare false with everything and could win min(); it is never chosen."""
    finite = [s for s in m1 if math.isfinite(m1[s] + m2[s])]
    if not finite:
        raise UserError(f"SCD: Metric 1 + Metric 2 is not finite for any teacher checkpoint ({sorted(m1)}); "
                        "the probe log-probs hold NaN or the checkpoints put zero probability on the student's tokens")
    return min(finite, key=lambda s: (m1[s] + m2[s], s))


def balance_metrics(m1: dict[int, float], m2: dict[int, float], kind: str = "none",
                    weight: float = 1.0) -> tuple[dict[int, float], dict[int, float], dict]:
    """Metric 1 and Metric 2 put on a common footing before SCD adds them (not in the paper; "none" is the paper).

        none:    Metric 1 (c) + Metric 2 (c)
        weight:  Metric 1 (c) + w · Metric 2 (c)                       (w = --metric2-weight)
        spread:  Metric 1 (c) / spread1 + Metric 2 (c) / spread2,      spread_i = max_c − min_c of Metric i

    over the candidates SCD may choose at this stage whose sum is finite. A spread of 0 (one candidate, or all
    equal) divides by 1: a metric that is the same for every candidate cannot decide, and any other divisor leaves
    it just as constant. Returns the two terms whose sum SCD minimises, and what was used, for schedule.jsonl.
    """
    if kind == "none":
        return m1, m2, {}
    if kind == "weight":
        return m1, {s: weight * v for s, v in m2.items()}, {"metric_balance": "weight", "metric2_weight": weight}
    spreads = []
    for m in (m1, m2):
        finite = [v for s, v in m.items() if math.isfinite(m1[s] + m2[s])]
        spreads.append(max(finite) - min(finite) if finite else 0.0)
    d1, d2 = (sp if sp > 0 else 1.0 for sp in spreads)
    return ({s: v / d1 for s, v in m1.items()}, {s: v / d2 for s, v in m2.items()},
            {"metric_balance": "spread", "spread1": spreads[0], "spread2": spreads[1]})


def cd_choice(steps: list[int], stage: int, n_stages: int) -> int:
    """CD: the checkpoints in training order, spread evenly over the stages. Stage s uses the last checkpoint of
    the s-th of n_stages equal shares of the sequence, so the last stage always ends on the final checkpoint."""
    k = len(steps)
    return steps[-(-(stage + 1) * k // n_stages) - 1]


def td_choice(index: dict, final: bool = False) -> int:
    """TD: always the best checkpoint (lowest val loss), or the final one."""
    if final:
        return index["final"] if index["final"] is not None else index["steps"][-1]
    return index["best"]


def candidate(step: int, m1: float | None, m2: float | None) -> dict:
    """One schedule.jsonl candidate. A non-finite metric is written as null with "finite": false (JSON has no NaN),
    so the record shows why SCD passed the checkpoint over."""
    if m1 is None:
        return {"ckpt": step, "metric1": None, "metric2": None, "sum": None}
    total = m1 + m2
    if math.isfinite(total):
        return {"ckpt": step, "metric1": m1, "metric2": m2, "sum": total}
    return {"ckpt": step, "metric1": m1 if math.isfinite(m1) else None, "metric2": m2 if math.isfinite(m2) else None,
            "sum": None, "finite": False, "non_finite": {"metric1": str(m1), "metric2": str(m2)}}


class Scheduler:
    """Chooses the teacher checkpoint at each stage start, and logs each choice as one schedule.jsonl row.

    probe_logp(model) gives a model's log-probs on the probe set (only SCD asks). `history` is the schedule.jsonl
    rows of a resumed run: a stage already chosen keeps its choice, and --distinct and --forward-only remember them.
    """

    def __init__(self, kind: str, index: dict, n_stages: int, cache=None, probe_logp=None, final: bool = False,
                 distinct: bool = False, history=(), balance: str = "none", metric2_weight: float = 1.0,
                 forward_only: bool = False, log=None):
        if kind == "scd" and cache is None:
            raise ValueError("SCD needs a probe cache")
        self.kind, self.index, self.n_stages, self.cache, self.final = kind, index, n_stages, cache, final
        self.probe_logp, self.log, self.records = probe_logp, log, list(history)
        self.m1 = None  # Metric 1 per checkpoint, filled on the first SCD choice
        self.chosen = {r["stage"]: r["chosen"] for r in history}
        # distinct: no checkpoint serves two stages (SCD takes the argmin over the unused ones; CD with no more
        # stages than checkpoints never repeats); forward_only: SCD never goes back before the last stage's choice
        self.distinct, self.used = distinct, set(self.chosen.values())
        self.forward_only, self.last = forward_only, (list(self.chosen.values())[-1] if self.chosen else None)
        self.balance, self.metric2_weight = balance, metric2_weight

    def choose(self, stage: int, step: int, student=None) -> int:
        """The teacher checkpoint of `stage` (which starts at optimiser step `step`): TD's one, CD's next, or SCD's
        argmin of Metric 1 + Metric 2 against `student` as it is now. Under torchrun every rank takes rank 0's."""
        if stage in self.chosen:
            return self.chosen[stage]
        steps = self.index["steps"]
        m1, m2, b1, b2 = {}, {}, {}, {}
        if self.kind == "td":
            chosen = td_choice(self.index, self.final)
        elif self.kind == "cd":
            chosen = cd_choice(steps, stage, self.n_stages)
        else:
            if self.m1 is None:
                best = self.cache.load(self.index["best"])
                self.m1 = {s: metric1(best, self.cache.load(s)) for s in steps}
            logp = self.probe_logp(student)
            m1, m2 = self.m1, {s: metric2(logp, self.cache.load(s)) for s in steps}
            free = [s for s in steps if not (self.distinct and s in self.used)
                    and not (self.forward_only and self.last is not None and s < self.last)]
            if not free:
                raise UserError(f"SCD at stage {stage}: no teacher checkpoint is left to choose (--distinct used "
                                f"{sorted(self.used)}, --forward-only allows none before {self.last})")
            b1, b2, used_balance = balance_metrics({s: m1[s] for s in free}, {s: m2[s] for s in free},
                                                   self.balance, self.metric2_weight)
            chosen = scd_choice(b1, b2)
        record = {"stage": stage, "step": step, "schedule": self.kind, "chosen": chosen,
                  "candidates": [candidate(s, m1.get(s), m2.get(s)) for s in steps]}
        if self.kind == "scd" and (self.balance != "none" or self.forward_only):
            # the terms SCD compared (null for a checkpoint it could not choose); the paper's runs keep the plain form
            for c in record["candidates"]:
                s = c["ckpt"]
                c["score_terms"] = [b1[s], b2[s]] if s in b1 and math.isfinite(b1[s] + b2[s]) else None
            record.update(used_balance, forward_only=self.forward_only)
        chosen, record = runtime.broadcast_object((chosen, record))  # every rank follows rank 0's choice
        self.chosen[stage], self.last = chosen, chosen
        self.used.add(chosen)
        self.records.append(record)
        if self.log is not None:
            self.log.log(record)
        return chosen


def format_metric1(m1: dict[int, float], metas: dict[int, dict], best: int, final: int | None) -> str:
    """Metric 1 per checkpoint of one teacher run, beside its val loss: how far each footstep is from the best."""
    head = f"{'checkpoint':>12} {'metric1':>10} {'val_loss':>10}"
    lines = [head, "-" * len(head)]
    for s, v in m1.items():
        val = metas[s].get("val_loss")
        lines.append(f"{s:>12} {v:>10.4f} " + (f"{val:>10.4f}" if val is not None else f"{'-':>10}")
                     + ("  (best)" if s == best else "") + ("  (final)" if s == final else ""))
    return "\n".join(lines)


def format_table(record: dict, best: int) -> str:
    """The candidates of one selection: checkpoint, Metric 1, Metric 2, their sum, and which was chosen."""
    head = f"{'checkpoint':>12} {'metric1':>10} {'metric2':>10} {'sum':>10}  chosen"
    lines = [head, "-" * len(head)]
    for c in record["candidates"]:
        vals = " ".join(f"{c[k]:>10.4f}" if c[k] is not None else f"{'-':>10}" for k in ("metric1", "metric2", "sum"))
        mark = "  <--" if c["ckpt"] == record["chosen"] else ""
        lines.append(f"{c['ckpt']:>12} {vals}{mark}" + ("  (best)" if c["ckpt"] == best else "")
                     + ("  (non-finite: never chosen)" if c.get("finite") is False else ""))
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the probe set and its cache


def probe_items(items: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed random subset of the training items (in training order); the same (items, size, seed), the same set."""
    keep = sorted(random.Random(f"probe-{seed}").sample(range(len(items)), min(size, len(items))))
    return [items[i] for i in keep]


def probe_logprobs(model, items: list[dict], pad_id: int, batch_size: int, device, dtype: str = "fp32"):
    """fp32 log-softmax (N, V) on the CPU at the answer positions of `items`, in order."""
    return torch.cat([torch.log_softmax(logits.float(), -1).cpu() for _, logits, _, _ in
                      answer_batches(model, items, pad_id, batch_size, device, dtype)])


class ProbeCache:
    """Log-probs (N, V) of each teacher checkpoint on the probe set: root/probe-<key>/step_XXXXXX.safetensors.

    The key is a hash of everything the values depend on: the probe's examples (checkpoints.items_fingerprint: ids,
    tokens and labels, which carry the task, chat template and --max-len), the tokenizer's files, the dtype, the
    device kind, and each checkpoint's step and content fingerprint (checkpoints.model_fingerprint). Any change is
    another key, so it is computed afresh; stale values are never read."""

    def __init__(self, root, items: list[dict], checkpoints: list[tuple[int, Path]], dtype: str = "fp32",
                 device="cpu", tokenizer_files=()):
        self.items, self.paths, self.dtype, self.device = items, dict(checkpoints), dtype, torch.device(device)
        self.key = {"probe": items_fingerprint(items),
                    "tokenizer": files_fingerprint(tokenizer_files), "dtype": dtype, "device": self.device.type,
                    "checkpoints": [[s, model_fingerprint(p)] for s, p in checkpoints]}
        self.dir = Path(root) / f"probe-{hashlib.sha256(json.dumps(self.key).encode()).hexdigest()[:16]}"

    def file(self, step: int) -> Path:
        return self.dir / f"{checkpoint_name(step)}.safetensors"

    def build(self, pad_id: int, batch_size: int):
        """Run each checkpoint whose file is missing over the probe set, one model in memory at a time."""
        todo = [s for s in self.paths if not self.file(s).exists()]
        for step in tqdm(todo, desc="probe cache", disable=not todo, leave=False):
            model = load_model(self.paths[step], device=self.device)
            logp = probe_logprobs(model, self.items, pad_id, batch_size, self.device, self.dtype)
            del model
            save_tensors(self.file(step), {"logp": logp}, {"step": str(step), "n_probe": str(len(self.items)),
                                                          "dtype": self.dtype, "device": self.device.type})
        return self

    def load(self, step: int) -> torch.Tensor:
        from safetensors.torch import load_file
        return load_file(str(self.file(step)))["logp"]


def add_balance_args(p: argparse.ArgumentParser):
    """SCD's metric balance flags, shared with distill.py."""
    p.add_argument("--metric-balance", choices=BALANCES, default="none",
                   help="how SCD adds its metrics: none (the paper: Metric 1 + Metric 2), spread (each divided by "
                        "its max - min over the stage's candidates), weight (Metric 1 + w * Metric 2)")
    p.add_argument("--metric2-weight", type=float, default=1.0, help="w of --metric-balance weight")


def check_balance_args(args, given: set[str]):
    if "metric2_weight" in given and args.metric_balance != "weight":
        raise UserError(f"--metric2-weight: is the w of --metric-balance weight; --metric-balance "
                        f"{args.metric_balance} does not use it")
    if not (args.metric2_weight >= 0 and math.isfinite(args.metric2_weight)):
        raise UserError(f"--metric2-weight {args.metric2_weight}: must be finite and >= 0")

# -----------------------------------------------------------------------------


def main(argv=None):
    runtime.single_process("schedule.py")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="teacher SFT run dir holding step_XXXXXX checkpoints")
    p.add_argument("--student", default="models/student",
                   help="student model dir (HF layout) or Hugging Face id to score against")
    p.add_argument("--probe-size", type=int, default=PROBE_SIZE, help="training examples in the probe set")
    p.add_argument("--probe-cache", default="runs/probe_cache", help="dir of the teacher probe log-prob cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe draw (distill.py uses its --seed)")
    p.add_argument("--metric1-only", action="store_true",
                   help="print only Metric 1 (and the val loss) per checkpoint of --teacher: no student needed")
    add_balance_args(p)
    add_scoring_args(p)
    argv_given = runtime.given_flags(p, argv)
    args = p.parse_args(argv)
    if args.metric1_only:
        runtime.refuse_unused(argv_given, {k: "--metric1-only scores no student" for k in
                                       ("student", "metric_balance", "metric2_weight")})
    check_balance_args(args, argv_given)
    device = resolve_scoring_args(args, argv_given)
    if args.probe_size <= 0:
        raise UserError("--probe-size must be positive")

    index = read_checkpoint_index(args.teacher)
    checkpoints = list_checkpoints(args.teacher)
    first = checkpoints[0][1]
    if not args.metric1_only:
        data.check_same_vocab({f"--student {args.student}": args.student, f"--teacher {first}": first})
    tok = data.load_tokenizer(first if args.metric1_only else args.student)
    _, items = load_split(tok, args, "train", args.train_size)
    probe = probe_items(items, args.probe_size, args.seed)
    cache = ProbeCache(args.probe_cache, probe, checkpoints, args.dtype, device, tok.files)
    cache.build(tok.pad_id, args.batch_size)
    print(f"probe: {len(probe)} examples, {cache.load(index['best']).shape[0]} answer tokens; cache {cache.dir}")
    if args.metric1_only:
        best = cache.load(index["best"])
        m1 = {s: metric1(best, cache.load(s)) for s, _ in checkpoints}
        print(format_metric1(m1, {s: read_json(path / "meta.json") for s, path in checkpoints}, index["best"],
                             index["final"]))
        return
    student = load_model(args.student, device=device)
    student_logp = lambda m: probe_logprobs(m, probe, tok.pad_id, args.batch_size, device, args.dtype)  # noqa: E731
    scheduler = Scheduler("scd", index, 1, cache, student_logp,
                          balance=args.metric_balance, metric2_weight=args.metric2_weight)
    scheduler.choose(0, 0, student)
    record = scheduler.records[-1]
    if record.get("metric_balance"):
        print(f"metric balance: {json.dumps({k: v for k, v in record.items() if k.startswith(('metric', 'spread'))})}"
              "; chosen by the balanced sum")
    print(format_table(record, index["best"]))


if __name__ == "__main__":
    run_cli(main)
