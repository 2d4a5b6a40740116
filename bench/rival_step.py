"""The wall time of one optimiser step of each rival against TD's, on the same real batch, models and optimiser.

    python bench/rival_step.py                           # models/student from models/teacher, bf16 autocast
    python bench/rival_step.py --student runs/experiment/ncbi_disease/student_s0/step_000189

TD:   forward KL from the teacher and gold CE (α 0.5), as experiment.py's td runs it.
TAID: KL to the interpolated target (α 1), with its t updated after the step.
GKD:  JSD(0.5) (α 1); an off-policy step trains on the gold answers, an on-policy one first samples the student's
      answers (temperature 1, the task's generation cap) and trains on them. At λ = 0.5 a step costs the mean of
      the two, which is printed as well.
The variants alternate, --rounds times, so load from other processes on this machine hits them alike; the median of
the per-round ratios to TD is reported.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads, timed_rounds  # noqa: E402
from distill_overhead import add_step_args, real_batch  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
import train  # noqa: E402
from losses import KDTerm, TAIDTerm  # noqa: E402
from model import load_model  # noqa: E402
from on_policy import OnPolicy  # noqa: E402
from runtime import run_cli  # noqa: E402
from teachers import ModelTeacher  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_args(p)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every variant once)")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    device = torch.device("cpu")
    tok = data.load_tokenizer(a.student)
    batch = real_batch(tok, a.task, 200, a.batch_size, a.max_len)
    student = load_model(a.student).train()
    teacher = ModelTeacher(load_model(a.teacher).requires_grad_(False).eval(), device, a.dtype)
    optimizer = train.make_optimizer(student, 1e-6)
    sampler = OnPolicy(1.0, tok, data.get_task(a.task).max_new_tokens, seed=0, device=device, dtype=a.dtype)
    terms = {"td": KDTerm("fkl"), "taid": TAIDTerm(total_steps=100), "gkd": KDTerm("jsd", beta=0.5)}
    alpha = {"td": 0.5, "taid": 1.0, "gkd": 1.0}

    def step(name: str, on_policy: bool = False):
        def run():
            micro = sampler([batch], student, 0) if on_policy else [batch]
            stats = distill.distill_step(student, teacher, None, terms[name], micro, alpha[name], device, a.dtype)
            terms[name].update(stats["kd"], 0)
            train.apply_update(optimizer, 1e-6, 0, stats["loss"], stats["grad_norm"])
        return run

    runs = {"td": step("td"), "taid": step("taid"), "gkd_off": step("gkd"), "gkd_on": step("gkd", True)}
    B, T = batch["input_ids"].shape
    print(f"student {a.student} ({student.num_params() / 1e6:.1f}M), teacher {a.teacher}, {a.dtype}; batch {B}x{T}, "
          f"{train.n_answer_tokens(batch)} answer tokens; torch {torch.get_num_threads()} threads")
    times = timed_rounds(runs, a.rounds)
    times["gkd_0.5"] = [(x + y) / 2 for x, y in zip(times["gkd_off"], times["gkd_on"])]
    labels = {"td": "TD step", "taid": "TAID step", "gkd_off": "GKD step on gold answers",
              "gkd_on": "GKD step on sampled answers", "gkd_0.5": "GKD step at λ = 0.5 (mean)"}
    for k, label in labels.items():
        ratio = statistics.median(x / t for x, t in zip(times[k], times["td"]))
        print(f"  {label:30s} {statistics.median(times[k]):6.2f} s  {ratio:5.2f}x TD  (rounds: "
              f"{', '.join(f'{x:.2f}' for x in times[k])})")


if __name__ == "__main__":
    run_cli(main)
