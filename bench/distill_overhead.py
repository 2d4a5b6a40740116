"""Distillation overhead: one distill.py step vs a student SFT step plus a teacher forward on the same batch.

    python bench/distill_overhead.py                     # models/student from models/teacher, SCD defaults (AW, fkl)
    python bench/distill_overhead.py --no-aw --loss jsd --dtype fp32

reference = train.train_step + optimiser step on the student, plus the teacher's no-grad answer logits
(train.answer_logits) on the same batch: the work any logit distillation must do. distill = distill.distill_step +
the same optimiser step: teacher logits, AW weights from the teacher's CE, the chunked divergence with the student's
head inside, backward. The ratio distill / reference is what the scheduler-free part of SCD costs on top (target:
<= 1.10x); the per-stage probe and checkpoint switch are measured by bench/ckpt_switch.py. The batch is a real
length-grouped training batch of the task. The two alternate, --rounds times, so load from other processes on
this machine hits both alike; the median of the per-round ratios is reported.
"""

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads, timed_rounds  # noqa: E402
import data  # noqa: E402
import distill  # noqa: E402
import losses  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from losses import KDTerm  # noqa: E402
from model import load_model  # noqa: E402
from runtime import run_cli  # noqa: E402
from teachers import ModelTeacher  # noqa: E402


def real_batch(tok, task, n, batch_size, max_len):
    """A median-length batch of the task's first n training examples, grouped by length as sft.py does."""
    items, _ = data.encode_split(tok, data.load_examples(task, "train", limit=n), max_len)
    batches = data.length_grouped_batches([len(it["input_ids"]) for it in items], batch_size, seed=0, epoch=0)
    batches.sort(key=lambda b: max(len(items[i]["input_ids"]) for i in b))
    return data.collate([items[i] for i in batches[len(batches) // 2]], tok.pad_id)


def add_step_args(p):
    """The models and the real batch of a one-step benchmark (bench/rival_step.py takes them too)."""
    p.add_argument("--student", default="models/student", help="student model dir (trained)")
    p.add_argument("--teacher", default="models/teacher", help="teacher model dir or checkpoint (frozen)")
    p.add_argument("--task", default="ncbi_disease", help="task whose training batch is used")
    p.add_argument("--batch-size", type=int, default=8, help="examples in the batch (cpu preset: 8)")
    p.add_argument("--max-len", type=int, default=256, help="truncate examples to this many tokens")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="as distill.py's --dtype")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_args(p)
    p.add_argument("--loss", choices=sorted(losses.DIVERGENCES), default="fkl", help="the KD divergence")
    p.add_argument("--aw", action=argparse.BooleanOptionalAction, default=True, help="AW weights (else alpha 0.5)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (each runs both once)")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    device = torch.device("cpu")
    tok = data.load_tokenizer(a.student)
    batch = real_batch(tok, a.task, 200, a.batch_size, a.max_len)
    student = load_model(a.student).train()
    teacher_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32  # as distill.py loads it
    teacher = load_model(a.teacher, dtype=teacher_dtype).requires_grad_(False).eval()
    optimizer = train.make_optimizer(student, 1e-6)
    args = SimpleNamespace(loss=a.loss, temperature=1.0, alpha=0.5, beta=0.5, lam=0.1, dtype=a.dtype)
    l_stu = torch.rand(a.batch_size) + 0.5
    stu_sft = (lambda ids: l_stu[:len(ids)]) if a.aw else None

    def reference():
        with torch.no_grad(), runtime.autocast(device, a.dtype):
            train.answer_logits(teacher, batch)
        loss, grad_norm, _ = train.train_step(student, [batch], device, a.dtype)
        train.apply_update(optimizer, 1e-6, 0, loss, grad_norm)

    def distill_step():
        stats = distill.distill_step(student, ModelTeacher(teacher, device, a.dtype), stu_sft, KDTerm.of(args), [batch],
                                     args.alpha, device, a.dtype)
        train.apply_update(optimizer, 1e-6, 0, stats["loss"], stats["grad_norm"])

    runs = {"reference": reference, "distill": distill_step}
    B, T = batch["input_ids"].shape
    print(f"student {a.student} ({student.num_params() / 1e6:.1f}M), teacher {a.teacher} "
          f"({teacher.num_params() / 1e6:.1f}M, {a.dtype}); batch {B}x{T}, {train.n_answer_tokens(batch)} answer "
          f"tokens; {a.loss}{' + AW' if a.aw else ''}; torch {torch.get_num_threads()} threads")
    print("other processes share this CPU: the two alternate and medians are compared")
    times = timed_rounds(runs, a.rounds)
    for k, label in (("reference", "student SFT step + teacher forward"), ("distill", "distill step")):
        print(f"  {label:36s} {statistics.median(times[k]):6.2f} s  (rounds: "
              f"{', '.join(f'{x:.2f}' for x in times[k])})")
    ratio = statistics.median(d / r for d, r in zip(times["distill"], times["reference"]))
    print(f"distill step / (student step + teacher forward), median of per-round ratios: {ratio:.3f}x "
          f"(target <= 1.10x)")


if __name__ == "__main__":
    run_cli(main)
