"""The machinery around distill.py's staged loop: every input checked before the run dir is touched, the run dir and
its resume point, the student (sharded under torchrun), and the seams the loop takes its parts from:

    scheduler   schedule.Scheduler: the teacher checkpoint of each stage, logged to schedule.jsonl
    teachers    teachers.CheckpointTeachers (a loaded checkpoint, whole or sharded) or teacher_cache.TeacherCache
    anchor      weights.FrozenAnchor (the frozen SFT student's L_stuSFT) or weights.StageAnchor (--aw-anchor current)

and, at the stage ends, the validation, --sides, the stage export and the resume state.
"""

import math
import sys
from pathlib import Path

import data
import evaluate
import runtime
import schedule
import teacher_cache
import weights
from checkpoints import (MetricsLog, export, items_fingerprint, latest_resumable,
                         list_checkpoints, load_resume_state, model_fingerprint, prepare_out_dir, read_checkpoint_index,
                         save_resume_state, sft_model, RESUME_FREE, STATE_FILES)
from footsteps import subset_steps
from losses import KDTerm, TAIDTerm
from model import load_model
from on_policy import OnPolicy
from runtime import UserError, read_json
from teachers import CheckpointTeachers
from train import Progress, load_splits, run_length, step_batches


class DistillRun:
    """One distill.py run: its inputs, run dir, position (stage, k, step) and the seams of the staged loop."""

    def __init__(self, args):
        self.args = args
        self.best = None  # --val-metric: the best stage so far, {"stage", "step", "val_metric"}
        self.kd_state = None  # what the KD term keeps across a resume (TAID's t)
        self.device = runtime.resolve_device(args.device)
        runtime.init_distributed(self.device)  # torchrun: one process per rank; without it, nothing
        args.dtype = runtime.resolve_dtype(args.dtype, self.device)
        self.check_inputs()
        self.make_out_dir()
        self.stage, self.k, self.step, tokens_seen, resume_from = self.resume_point()
        self.make_seams()
        self.load_student(resume_from)
        self.progress = Progress(self.log, self.n_steps, self.step, f"distill {args.variant}", args.log_every,
                                 tokens_seen)
        self.describe()

    # -------------------------------------------------------------------------
    # before the loop

    def check_inputs(self):
        """Teacher checkpoints, students, data and caches, refused by name before any heavy work."""
        args, device = self.args, self.device
        index = read_checkpoint_index(args.teacher)  # refuses a run dir without complete checkpoints
        self.index, self.checkpoints = candidate_checkpoints(args, index, dict(list_checkpoints(args.teacher)))
        n_usable = 1 if args.schedule == "td" else len(self.index["steps"])
        if args.distinct and args.stages > n_usable:
            raise UserError(f"--stages {args.stages} with --distinct: {args.schedule.upper()} has {n_usable} teacher "
                            f"checkpoint(s) in {args.teacher} and none may serve two stages")
        named = {f"--teacher {args.teacher}/{p.name}": p for p in self.checkpoints.values()}
        named[f"--init {args.init}"] = Path(args.init)
        self.student_sft = None
        if args.aw and args.aw_anchor == "sft":
            self.student_sft = sft_model(args.student_sft)
            named[f"--student-sft {self.student_sft}"] = self.student_sft
        data.check_same_vocab(named)
        for bad, why in ((args.teacher_cache, "the sampled answers need a live teacher; drop --teacher-cache"),
                         (args.aw, "AW weighs each sample's gold CE against the teacher's and sampled answers have "
                                   "no gold: add --no-aw"),
                         (runtime.world() > 1, "sampling runs in one process: start it with python, not torchrun")):
            if args.on_policy and bad:
                raise UserError(f"--on-policy {args.on_policy}: {why}")
        runtime.seed_everything(args.seed)
        self.tok = data.load_tokenizer(args.init)
        _, self.train_items, self.val_examples, self.val_items = load_splits(self.tok, args, "--max-new-tokens",
                                                                             args.max_new_tokens)
        self.eval_file, self.final_eval = final_evaluation(args)
        if args.val_metric and not self.val_examples:
            raise UserError(f"--val-metric: task {args.task} has no validation examples to choose the best stage by")
        self.sides = weights.SideLosses(args.sides, self.train_items, self.tok.pad_id, args.eval_batch_size, device,
                                        args.dtype) if args.sides else None
        self.probe = schedule.probe_items(self.train_items, args.probe_size, args.seed)
        self.cache = None
        if args.teacher_cache:  # only the checkpoints this schedule can choose need to be in it
            self.cache = teacher_cache.TeacherCache(args.teacher_cache)
            usable = [schedule.td_choice(self.index, args.td_ckpt == "final")] if args.schedule == "td" \
                else self.index["steps"]
            if args.schedule == "scd":  # Metric 1 measures from the best checkpoint, a candidate or not
                usable = sorted({*usable, self.index["best"]})
            self.cache.check(teacher_cache.cache_key(self.train_items, {s: self.checkpoints[s] for s in usable},
                                                     args.max_len, args.dtype, device.type),
                             self.probe if args.schedule == "scd" else ())
        if args.loss == "taid" and self.cache is not None and self.cache.form == "topk":
            raise UserError("--loss taid: its target interpolates the student's and the teacher's whole distributions; "
                            "a top-k cache keeps k of the teacher's log-probs: use an exact cache or none")

    def make_out_dir(self):
        """The run dir, once all inputs are good; its config.json holds the content of every input, so --resume
        refuses a retrained teacher or an edited data file by name."""
        args = self.args
        inputs = {"train": items_fingerprint(self.train_items), "val": items_fingerprint(self.val_items),
                  "init": model_fingerprint(args.init),
                  "teacher": {str(s): model_fingerprint(p) for s, p in self.checkpoints.items()},
                  "student_sft": model_fingerprint(self.student_sft) if self.student_sft else None}
        self.config = {**vars(args), "device": str(self.device), "world": runtime.world(), "inputs": inputs,
                       "final_eval": self.final_eval}
        # --save-every places resume states only: the run is bit-identical without them
        self.out = runtime.main_first(prepare_out_dir, args.out, self.config, args.resume, args.overwrite,
                                      RESUME_FREE + ("save_every",))
        self.global_batch, self.steps_per_epoch, total = run_length(self.train_items, args)
        self.stage_steps = math.ceil(args.stage_epochs * self.steps_per_epoch) if args.stage_epochs else \
            args.stage_steps or math.ceil(total / args.stages)
        self.warmup = int(args.warmup * self.stage_steps)
        self.n_steps = args.stages * self.stage_steps
        self.log, self.schedule_log = MetricsLog(self.out / "metrics.jsonl"), MetricsLog(self.out / "schedule.jsonl")

    def resume_point(self):
        """(stage, k, step, tokens seen, resume dir or None): where the loop starts. A resume forgets the log lines
        the interrupted run wrote after its state, and a stage not yet chosen is chosen again."""
        if not self.args.resume:
            return 0, 0, 0, 0, None
        found = latest_resumable(self.out / "resume")
        if found is None:
            raise UserError(f"--resume: {self.out} has no complete resume state yet; start over with --overwrite")
        path = found[1]
        progress = read_json(path / STATE_FILES[1])
        stage, k, chosen, tokens_seen = (progress[x] for x in ("stage", "k", "chosen", "tokens_seen"))
        self.best, self.kd_state = progress.get("best"), progress.get("kd")
        step = stage * self.stage_steps + k
        self.log.truncate_after(step)
        self.schedule_log.truncate_after(step if chosen is not None else step - 1)
        runtime.barrier()  # rank 0 truncated the logs; every rank reads the schedule's history next
        runtime.print0(f"resuming from {path}: stage {stage}, step {step} of {self.n_steps}")
        return stage, k, step, tokens_seen, path

    def make_seams(self):
        """The scheduler, the teacher source, AW's anchor, the KD term and the data source, from the flags."""
        args, device, tok = self.args, self.device, self.tok
        self.kd_term = TAIDTerm(self.n_steps, args.temperature, args.taid_t_start, alpha=args.taid_alpha,
                                beta=args.taid_beta) if args.loss == "taid" else KDTerm.of(args)
        if self.kd_state:
            self.kd_term.load(self.kd_state)
        self.on_policy = OnPolicy(args.on_policy, tok, args.max_new_tokens or data.get_task(args.task).max_new_tokens,
                                  args.seed, device, args.dtype) if args.on_policy else None
        probe_cache = None
        if args.schedule == "scd" and self.cache is not None:
            probe_cache = self.cache.probe(self.probe)
        elif args.schedule == "scd":
            probe_cache = schedule.ProbeCache(args.probe_cache, self.probe, list(self.checkpoints.items()),
                                              args.dtype, device, tok.files)
            def build():  # rank 0 scores the checkpoints; every rank then reads the files
                probe_cache.build(tok.pad_id, args.eval_batch_size)

            runtime.main_first(build)
        self.scheduler = schedule.Scheduler(
            args.schedule, self.index, args.stages, probe_cache,
            lambda model: schedule.probe_logprobs(model, self.probe, tok.pad_id, args.eval_batch_size, device,
                                                  args.dtype),
            final=args.td_ckpt == "final", distinct=args.distinct, history=self.schedule_log.rows(),
            balance=args.metric_balance, metric2_weight=args.metric2_weight, forward_only=args.forward_only,
            log=self.schedule_log)
        self.teachers = self.cache if self.cache is not None else CheckpointTeachers(
            self.checkpoints, device, args.dtype, args.teacher_sharding)
        self.anchor = None
        if args.aw and args.aw_anchor == "sft":
            key = weights.table_key(args.task, args.max_len, args.dtype, device, tok.files, self.student_sft)
            self.anchor = weights.FrozenAnchor(self.student_sft, self.train_items, tok, key, args.aw_table,
                                               self.out / "aw_losses.safetensors", args.eval_batch_size, device,
                                               args.dtype)
        elif args.aw:
            self.anchor = weights.StageAnchor(self.out / "aw_anchor", self.train_items, tok.pad_id,
                                              args.eval_batch_size, device, args.dtype)

    def load_student(self, resume_from):
        """The student: --init, or the resume state's weights; under torchrun each rank reads only its shards."""
        args = self.args
        self.student = load_model(resume_from or args.init, device=self.device,
                                  shard=lambda m: runtime.shard(m, self.device, args.dtype))
        self.student.set_activation_checkpointing(args.activation_checkpointing)
        self.resume_from = resume_from
        if resume_from is not None and self.k == 0:  # a stage boundary: weights and RNG; the optimiser is new
            load_resume_state(resume_from, self.student)
            self.resume_from = None

    def describe(self):
        args, index, world = self.args, self.index, runtime.world()
        runtime.print0(
            f"distill {args.variant}: {args.schedule.upper()}"
            f"{' + AW' if args.aw else f', alpha {args.alpha}'}, {args.loss} at T={args.temperature}; "
            f"{len(index['steps'])} teacher checkpoints (best {index['best']}"
            f"{', from the cache ' + self.cache.describe() if self.cache is not None else ''}), "
            f"{args.stages} stages x {self.stage_steps} steps ({self.steps_per_epoch}/epoch, batch {args.batch_size}x"
            f"{args.grad_accum}{f'x{world} ranks' if world > 1 else ''}), {len(self.train_items)} train examples, "
            f"{self.student.num_params() / 1e6:.1f}M-param student on {self.device} -> {self.out}")

    # -------------------------------------------------------------------------
    # in the loop

    def start_stage(self, chosen: int, optimizer):
        self.chosen = chosen
        runtime.print0(f"stage {self.stage}: teacher checkpoint {chosen}")
        if self.resume_from is not None:  # mid-stage: the optimiser's state too
            load_resume_state(self.resume_from, self.student, optimizer)
            self.resume_from = None
        self.progress.restart()

    def batches(self) -> list[dict]:
        """This rank's micro-batches of the current step: the gold answers, or with --on-policy (at its rate) the
        same prompts with the student's own sampled answers."""
        a = self.args
        micro = step_batches(self.train_items, self.step, self.steps_per_epoch, self.global_batch, a.grad_accum,
                             a.seed, self.tok.pad_id)
        return self.on_policy(micro, self.student, self.step) if self.on_policy is not None else micro

    def end_step(self, micro: list[dict], stats: dict, lr: float, optimizer):
        """A step done: its metrics.jsonl row, the bar, and a --save-every resume state inside the stage."""
        args = self.args
        row = {"step": self.step + 1, "stage": self.stage, "ckpt": self.chosen, **stats, "lr": lr,
               **self.kd_term.logged()}
        self.kd_term.update(stats["kd"], self.step)
        self.k, self.step = self.k + 1, self.step + 1
        self.progress.update(self.step, micro, row, last=self.k == self.stage_steps,
                             loss=f"{stats['loss']:.4f}", w=f"{stats['w']:.2f}", ckpt=self.chosen, lr=f"{lr:.1e}")
        if args.save_every and self.k % args.save_every == 0 and self.k < self.stage_steps:
            save_resume_state(self.out, self.step, self.student, self.tok,
                              {"step": self.step, "stage": self.stage, "ckpt": self.chosen},
                              {"stage": self.stage, "k": self.k, "chosen": self.chosen,
                               "tokens_seen": self.progress.tokens_seen, **self.kept_state()}, optimizer)

    def end_stage(self):
        """The stage's validation loss (and --sides, --val-metric), its export (and best/), and the resume state of
        the next stage's start."""
        args, student, stage, step = self.args, self.student, self.stage, self.step
        val = evaluate.validate(student, self.tok, args, self.val_examples, self.val_items, self.device,
                                loss_only=not args.val_metric) if self.val_items else {"val_loss": None}
        val_loss = val["val_loss"]
        row = {"step": step, "stage": stage, "eval": True, **val, **(self.sides(student) if self.sides else {})}
        self.log.log(row)
        meta = {"step": step, "stage": stage, "ckpt": self.chosen, "val_loss": val_loss, "variant": args.variant,
                "config": self.config, **({"val_metric": row["val_metric"]} if args.val_metric else {})}
        export(self.out, f"stage_{stage:02d}", step, student, self.tok, meta, args.max_shard_gb)
        if args.val_metric and (self.best is None or row["val_metric"] > self.best["val_metric"]):
            export(self.out, "best", step, student, self.tok, meta, args.max_shard_gb)
            self.best = {"stage": stage, "step": step, "val_metric": row["val_metric"]}
        self.stage, self.k = stage + 1, 0
        save_resume_state(self.out, step, student, self.tok, meta, {"stage": self.stage, "k": 0, "chosen": None,
                                                                    "tokens_seen": self.progress.tokens_seen,
                                                                    **self.kept_state()})
        runtime.print0(f"stage {stage} done: val_loss {val_loss if val_loss is None else round(val_loss, 4)}"
                       f" -> {self.out / f'stage_{stage:02d}'}")

    def kept_state(self) -> dict:
        """What a resume state holds beyond the loop's position: the best stage, the KD term's own state."""
        kd = self.kd_term.state()
        return {**({"best": self.best} if self.best else {}), **({"kd": kd} if kd else {})}

    def finish(self) -> Path:
        """The final export, and its evaluation on --eval-split (rank 0 alone, on a full copy; the others wait)."""
        args = self.args
        self.progress.close()
        final = export(self.out, "final", self.n_steps, self.student, self.tok,
                       {"step": self.n_steps, "variant": args.variant, "config": self.config}, args.max_shard_gb)
        if self.final_eval["split"] is not None and runtime.is_main():
            for name in ("best", "final") if args.val_metric else ("final",):  # final's eval marks the run done
                metrics = evaluate.evaluate_dir(self.out / name, args.task, args.eval_split, args.data_dir,
                                                self.eval_file,
                                                args.eval_size, args.eval_batch_size, args.max_new_tokens or None,
                                                self.device, args.dtype, progress=False, metric=args.metric,
                                                stop_repeats=args.stop_repeats)
                self.log.log({"step": self.n_steps, "final_eval": True, **metrics,
                              **({"checkpoint": name} if args.val_metric else {})})
                print(f"{name} {args.task} {args.eval_split}: {metrics['main']:.4f} (n={metrics['n']}) -> "
                      f"{self.out / name / f'eval_{args.task}_{args.eval_split}.json'}")
        runtime.barrier()
        runtime.print0(f"done: {self.out}/stage_00..stage_{args.stages - 1:02d}, {final}; schedule in "
                       f"{self.out / 'schedule.jsonl'}")
        return final


def final_evaluation(args) -> tuple[object, dict]:
    """The file the final evaluation scores (--task jsonl; None for a built-in task) and what config.json records of
    it: {"split"} (and "file"), or {"split": None, "why"} when there is none. A JSONL run whose --data names no file
    for --eval-split says so here, at the start."""
    if args.eval_split == "none":
        return None, {"split": None, "why": "--eval-split none"}
    if args.task != "jsonl":
        return None, {"split": args.eval_split}
    file = data.split_file(args.data, args.eval_split)
    if file is None:
        why = f"--data {args.data} names no {args.eval_split} file (train,val,test)"
        if runtime.is_main():
            print(f"warning: no final evaluation on --eval-split {args.eval_split}: {why}", file=sys.stderr)
        return None, {"split": None, "why": why}
    return file, {"split": args.eval_split, "file": file.path}


def candidate_checkpoints(args, index: dict, checkpoints: dict) -> tuple[dict, dict]:
    """The teacher checkpoints this run may use: all of them, or --candidates N of them placed by
    --candidate-spacing on the same run (footsteps.subset_steps). SCD's Metric 1 still measures from the run's best
    checkpoint, which stays loadable even when it is not a candidate. Returns (index, {step: path})."""
    if not args.candidates:
        return index, checkpoints
    steps = subset_steps(index["steps"], args.candidates, args.candidate_spacing)
    keep = sorted({*steps, index["best"]})
    return {**index, "steps": steps}, {s: checkpoints[s] for s in keep}
