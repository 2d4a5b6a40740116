"""How far a top-k teacher cache moves the KD term and AW's weight from the exact teacher, on real data.

    python bench/topk_error.py --teacher runs/teacher/step_000126 --students models/student,runs/student/step_000189

The first --n training examples of the task (the cpu preset's seeded subset) are scored by the teacher once: its
fp32 log-probs at every answer position are the exact reference. For each k they are reduced as teacher_cache.py
stores them (teacher_cache.top_k: k log-probs rounded to --precision, the tail's log-mass in fp32), and for each
student the KD term (losses.token_losses, --loss at --temperature) is computed from the exact teacher, from the
exact cache's --precision rounding, and from each top-k cache. Reported: the relative error of the mean KD over all
answer tokens, and the median and largest relative error of the per-sample mean KD (what a sample's loss sees).
AW's w = σ(log L_stuSFT − log L_ckpt) is computed with L_ckpt from the cached gold log-probs against the exact
teacher's CE.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import runtime  # noqa: E402
import teacher_cache  # noqa: E402
import train  # noqa: E402
import weights  # noqa: E402
from model import load_model  # noqa: E402
from runtime import run_cli  # noqa: E402


@torch.no_grad()
def answer_log_probs(model, items, pad_id, batch_size, dtype="fp32"):
    """fp32 log-probs (N, V), labels (N,), sample index (N,) over items, in order."""
    out, labels, rows = [], [], []
    for i in range(0, len(items), batch_size):
        batch = data.collate(items[i:i + batch_size], pad_id)
        with runtime.autocast(torch.device("cpu"), dtype):
            logits, y, r = train.answer_logits(model, batch)
        out.append(torch.log_softmax(logits.float(), -1))
        labels.append(y)
        rows.append(r + i)
    return torch.cat(out), torch.cat(labels), torch.cat(rows)


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs().clamp(min=1e-12)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher/step_000126", help="teacher checkpoint (SFT)")
    p.add_argument("--students", default="models/student", help="comma-separated student model dirs")
    p.add_argument("--task", default="ncbi_disease", help="task whose training split is scored")
    p.add_argument("--n", type=int, default=200, help="training examples scored")
    p.add_argument("--max-len", type=int, default=256, help="truncate examples to this many tokens")
    p.add_argument("--ks", default="16,64,256", help="comma-separated k of the top-k caches")
    p.add_argument("--precision", choices=sorted(teacher_cache.PRECISIONS), default="fp16",
                   help="on-disk rounding of the cached log-probs")
    p.add_argument("--loss", choices=sorted(losses.DIVERGENCES), default="fkl", help="the KD divergence")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the divergence")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    tok = data.load_tokenizer(a.teacher)
    args = argparse.Namespace(task=a.task, data=None, data_dir=None, max_len=a.max_len, refuse_long=False)
    _, items = train.load_split(tok, args, "train", 500)  # the cpu preset's subset, as every run uses it
    items = items[:a.n]
    teacher = load_model(a.teacher).requires_grad_(False).eval()
    logp, labels, rows = answer_log_probs(teacher, items, tok.pad_id, a.batch_size)
    del teacher
    N, V = logp.shape
    B = len(items)
    print(f"teacher {a.teacher}, {B} {a.task} training examples, {N} answer tokens, vocab {V}; {a.loss} at "
          f"T={a.temperature}; cache log-probs in {a.precision}")
    ks = [int(k) for k in a.ks.split(",")]
    targets = {"exact": logp.to(teacher_cache.PRECISIONS[a.precision]).float()}
    for k in ks:
        values, indices, tail = teacher_cache.top_k(logp, k, a.precision)
        targets[f"top-{k}"] = losses.TopK(values.float(), indices.long(), tail, V)
        top_mass = values.float().exp().sum(-1)
        print(f"  top-{k}: teacher mass outside the top k: median {float((1 - top_mass).median()):.2e}, "
              f"mean {float((1 - top_mass).mean()):.2e}")
    gold = logp.gather(-1, labels[:, None])[:, 0]
    ce_exact = losses.per_token_ce(logp, labels)
    l_ckpt_exact = weights.sample_mean(ce_exact, rows, B)
    l_ckpt_cache = weights.sample_mean(-gold, rows, B)  # what the cache stores in both forms: gold log-prob, fp32
    for path in a.students.split(","):
        student = load_model(path).requires_grad_(False).eval()
        s_logp, _, _ = answer_log_probs(student, items, tok.pad_id, a.batch_size)
        del student
        l_stu = weights.sample_mean(losses.per_token_ce(s_logp, labels), rows, B)
        w_exact = weights.aw_weight(l_stu, l_ckpt_exact)
        w_cache = weights.aw_weight(l_stu, l_ckpt_cache)
        with torch.no_grad():
            kd_ref, _ = losses.token_losses(s_logp, lambda x: x, logp, labels, a.loss, a.temperature)
            ref_sample = weights.sample_mean(kd_ref, rows, B)
            print(f"student {path}: exact mean KD {float(kd_ref.mean()):.4f} nats/token; AW w: max |Δw| "
                  f"{float((w_cache - w_exact).abs().max()):.2e} (L_ckpt from the cached gold log-probs, every k)")
            for name, target in targets.items():
                kd, _ = losses.token_losses(s_logp, lambda x: x, target, labels, a.loss, a.temperature)
                per_sample = rel(weights.sample_mean(kd, rows, B), ref_sample)
                print(f"  {name:>8}: mean KD {float(kd.mean()):.4f}, relative error of the mean "
                      f"{float(rel(kd.mean(), kd_ref.mean())):.2e}; per sample median "
                      f"{statistics.median(per_sample.tolist()):.2e}, max {float(per_sample.max()):.2e}")


if __name__ == "__main__":
    run_cli(main)
