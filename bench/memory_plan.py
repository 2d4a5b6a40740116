"""Memory plan per GPU for full fine-tuning and distillation of Llama models with FSDP2 (estimates, no GPU used).

    python bench/memory_plan.py                                   # every job, N = 1, 2, 4, 8, AC off and on
    python bench/memory_plan.py --totals                          # the totals only, one table
    python bench/memory_plan.py --job distill --ranks 2,4 --batch 4
    python bench/memory_plan.py --student llama-3.2-1b --teacher llama-3.2-3b
    python bench/memory_plan.py --job load                        # loading the teacher checkpoint, per rank

The setup modelled (fully_shard on each decoder layer and on the root; N ranks, one GPU each):
  trained model   MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): sharded fp32 master params, sharded
                  fp32 grads (after reduce-scatter), AdamW's two fp32 moments, i.e. 16 B/param / N; plus the
                  unsharded bf16 working copies of `working_bytes`; plus the activations of `layer_act_bytes`.
  loss            fp32 logits at answer positions only: student logits and their grad, and in distillation the
                  teacher's logits too, each once (distill.py builds the student's in chunks of 2^24 elements,
                  so this over-counts, by little: 0.24 GiB per copy at 512 answer tokens and vocab 128256).
  teacher         inference only: bf16 params sharded over N (2 B/param / N) plus its forward's working set (root
                  and two layers unsharded, reshard_after_forward=True), or a full bf16 copy per rank (2 B/param).
Loading a checkpoint (--job load) is planned apart: it happens before training and at every stage's teacher switch.
Everything is summed as if alive at once; the true peak (the start of the student's backward) is a little lower:
the teacher's working set is gone by then. Sequences are counted at the full --seq (padding included). Not counted,
left to the --headroom: the CUDA context and NCCL buffers (~1 GiB), allocator fragmentation, backward temporaries
(a layer's grads of its activations), fused AdamW's step (no full-size temporaries).
"""

import argparse
from dataclasses import dataclass

GiB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # the SwiGLU intermediate size
    vocab_size: int
    tied: bool  # lm_head shares embed_tokens' weight


MODELS = {s.name.lower(): s for s in [
    Shape("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, tied=False),
    Shape("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, tied=True),
    Shape("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, tied=True),
    Shape("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152, tied=True),
]}
# published parameter counts: a check that the counts below read the shapes right (asserted within 1 %)
PUBLISHED = {"llama-3.1-8b": 8.03e9, "llama-3.2-3b": 3.21e9, "llama-3.2-1b": 1.24e9, "smollm2-135m": 1.35e8}


# parameter counts

def layer_params(s: Shape) -> int:
    """One decoder layer: q, k, v, o projections (no biases), gate/up/down, two RMSNorm weights."""
    attn = s.dim * s.n_heads * s.head_dim * 2 + s.dim * s.n_kv_heads * s.head_dim * 2
    return attn + 3 * s.dim * s.hidden_dim + 2 * s.dim


def root_params(s: Shape) -> int:
    """The root FSDP unit: what is not in a decoder layer (embeddings, final norm, lm_head unless tied)."""
    return s.vocab_size * s.dim * (1 if s.tied else 2) + s.dim


def num_params(s: Shape) -> int:
    return s.n_layers * layer_params(s) + root_params(s)


# activations (bf16 = 2 bytes, fp32 = 4 bytes)

def layer_act_bytes(s: Shape) -> int:
    """Bytes autograd keeps per token for one decoder layer, no activation checkpointing, as model.py computes it:

        2 RMSNorms x (4d fp32 input x.float() + 2d bf16 normalised x + 2d bf16 output, the next matmuls' input
                      + 4 fp32 rsqrt)                                                    = 2 * (8d + 4)
        attention    q (2 H hd) + k, v (2 * 2 Hkv hd, GQA: k and v are narrower), post-RoPE, kept by SDPA
                     + output (2 H hd), which is also o_proj's input (a view, no copy)
                     + SDPA's fp32 logsumexp (4 H)                                       = 4 H hd + 4 Hkv hd + 4 H
        SwiGLU MLP   gate output g, silu(g), up output u, silu(g) * u = down_proj's input  = 4 * 2I

    i.e. 16d + 4 H hd + 4 Hkv hd + 8I + 4H + 8, about 49d for Llama-3.1-8B. Not kept: the residual adds and RoPE
    (they need no inputs in backward; RoPE multiplies by cos/sin, counted once in `extra_act_bytes`), and no T x T
    attention matrix (flash / memory-efficient SDPA recompute it). Korthikanti et al. 2022 get 34d + 5 a T for a
    GPT layer with dropout and stored attention scores; Llama has no dropout, but fp32 norms and a wider MLP.
    """
    norms = 2 * (4 * s.dim + 2 * s.dim + 2 * s.dim + 4)
    attn = 2 * s.n_heads * s.head_dim + 2 * 2 * s.n_kv_heads * s.head_dim + 2 * s.n_heads * s.head_dim + 4 * s.n_heads
    mlp = 4 * 2 * s.hidden_dim
    return norms + attn + mlp


def extra_act_bytes(s: Shape) -> int:
    """Per token outside the layers: the final RMSNorm (4d fp32 input + 2d normalised + 4 rsqrt; its output is only
    indexed at answer positions, so not kept) and the bf16 cos, sin tables (B, 1, T, hd) shared by every layer."""
    return 4 * s.dim + 2 * s.dim + 4 + 2 * 2 * s.head_dim


def act_bytes(s: Shape, tokens: int, ac: bool) -> int:
    """Activations kept at the start of backward. With activation checkpointing around each decoder layer only its
    bf16 input (2d per token) stays, and backward recomputes one layer at a time: its full activations come back."""
    if ac:
        return tokens * (s.n_layers * 2 * s.dim + layer_act_bytes(s) + extra_act_bytes(s))
    return tokens * (s.n_layers * layer_act_bytes(s) + extra_act_bytes(s))


# FSDP2 states

def sharded_bytes(s: Shape, n: int) -> float:
    """Trained model: fp32 params 4 + fp32 grads 4 + AdamW exp_avg, exp_avg_sq 8 = 16 B/param, split over n ranks."""
    return 16 * num_params(s) / n


def working_bytes(s: Shape) -> int:
    """Unsharded bf16 copies alive during the trained model's backward, whatever N (N = 1 still all-gathers):
    - two layers' params: the one computing and the next one, prefetched          2 B x 2 layers
    - the computing layer's bf16 grads, before reduce-scatter                       2 B x 1 layer
    - the previous layer's fp32 reduce-scatter input (reduce_dtype=fp32), in flight 4 B x 1 layer
    - the root's params, kept from forward to the end of backward (reshard_after_forward=False)
    - the lm_head's (or tied embedding's) grad: made first in backward, reduce-scattered last, because the root's
      post-backward runs in FSDP2's final callback (its input, the token ids, has no grad to hook)."""
    return 10 * layer_params(s) + 2 * root_params(s) + 2 * s.vocab_size * s.dim


def teacher_bytes(t: Shape, n: int, replicated: bool) -> float:
    """Frozen bf16 teacher: a full copy per rank, or 2 B/param / n plus its forward's unsharded root and two layers
    (counted as if they coexisted with the student's backward; the teacher's forward is over by then)."""
    if replicated:
        return 2 * num_params(t)
    return 2 * num_params(t) / n + 2 * (root_params(t) + 2 * layer_params(t))


def logits_bytes(vocab: int, answer_tokens: int, distill: bool) -> int:
    """fp32 (answer tokens, V): the student's logits and their grad, plus the teacher's logits when distilling."""
    return (3 if distill else 2) * answer_tokens * vocab * 4


# loading a checkpoint

def largest_tensor(s: Shape) -> int:
    """Parameters of the largest tensor: the embeddings (or the untied lm_head), else an MLP projection."""
    return max(s.vocab_size * s.dim, s.dim * s.hidden_dim)


def load_bytes(s: Shape, n: int, file_bytes: int, kept_bytes: int, own_rows: bool) -> dict:
    """One rank's peak while loading a checkpoint of `file_bytes` per parameter into `kept_bytes` per parameter.

    Whole read (one process; under torchrun each rank loads the whole checkpoint, then fully_shard keeps its rows):
    the rank's device holds the whole model, plus under torchrun its shards as fully_shard copies them out; the host
    maps every page of the files. Own rows (model.load_model with `shard`: the model is sharded on the meta device
    and each rank reads only its rows, tensor by tensor): the device holds 1/N of the model plus one tensor's rows as
    they are converted; the host maps only those rows, and unmaps them once copied."""
    p = num_params(s)
    if own_rows:
        rows = largest_tensor(s) / n
        return {"device": kept_bytes * p / n + kept_bytes * rows, "host": file_bytes * rows}
    return {"device": kept_bytes * p * (1 + (1 / n if n > 1 else 0)), "host": file_bytes * p}


def load_table(a) -> str:
    """The teacher's load per rank, a whole read against own rows, for each N."""
    t = MODELS[a.teacher]
    f, k = DTYPE_BYTES[a.load_file], DTYPE_BYTES[a.load_kept]
    one = load_bytes(t, 1, f, k, False)
    lines = [f"loading {t.name} ({num_params(t) / 1e9:.2f}e9 params, largest tensor {largest_tensor(t) / 1e6:.0f}e6), "
             f"a {a.load_file} checkpoint kept in {a.load_kept}: GiB per rank at the load's peak",
             f"  one process reads it whole: device {one['device'] / GiB:.2f}, host {one['host'] / GiB:.2f}",
             f"{'N':>2} | {'whole read: device':>18} {'host':>6} | {'own rows: device':>16} {'host':>6}"]
    lines.append("-" * len(lines[-1]))
    for n in [n for n in a.ranks if n > 1]:
        whole, own = load_bytes(t, n, f, k, False), load_bytes(t, n, f, k, True)
        lines.append(f"{n:>2} | {whole['device'] / GiB:18.2f} {whole['host'] / GiB:6.2f} | "
                     f"{own['device'] / GiB:16.2f} {own['host'] / GiB:6.2f}")
    lines.append("host: the checkpoint pages a rank maps. A node's ranks share one copy in the page cache, but each "
                 f"rank's\nresident set counts what it maps: a whole read on {max(a.ranks)} ranks is {max(a.ranks)} x "
                 f"{one['host'] / GiB:.2f} GiB of summed RSS, and {max(a.ranks)} reads of the same files.")
    return "\n".join(lines)


# the plan

def plan_row(student: Shape, teacher: Shape | None, replicated: bool, n: int, ac: bool, a) -> dict:
    tokens = a.batch * a.seq
    row = dict(shards=sharded_bytes(student, n), working=working_bytes(student),
               activ=act_bytes(student, tokens, ac),
               logits=logits_bytes(student.vocab_size, a.batch * a.answer_tokens, teacher is not None),
               teacher=teacher_bytes(teacher, n, replicated) if teacher else 0)
    row = {k: v / GiB for k, v in row.items()}
    row["total"] = sum(row.values())
    return row


def jobs(a) -> dict:
    """job name -> (trained model, teacher or None, teacher replicated)."""
    t, s = MODELS[a.teacher], MODELS[a.student]
    return {"teacher-sft": (t, None, False), "student-sft": (s, None, False),
            "distill": (s, t, False), "distill-replicated": (s, t, True)}


def summary(name: str, student: Shape, teacher: Shape | None, replicated: bool) -> str:
    """Bytes per parameter of the job, a line or two per model."""
    head = student.vocab_size * student.dim
    lines = [name, f"  trained {student.name}, {num_params(student) / 1e9:.2f}e9 params: 16 B/param sharded over N",
             f"    + unsharded bf16, whatever N: {working_bytes(student) / GiB:.2f} GiB = 10 B x "
             f"{layer_params(student) / 1e6:.0f}e6 (a layer) + 2 B x {root_params(student) / 1e6:.0f}e6 (root)"
             f" + 2 B x {head / 1e6:.0f}e6 (head grad)"]
    if teacher and replicated:
        lines.append(f"  teacher {teacher.name}, {num_params(teacher) / 1e9:.2f}e9 params: 2 B/param on every rank")
    elif teacher:
        unsharded = root_params(teacher) + 2 * layer_params(teacher)
        lines += [f"  teacher {teacher.name}, {num_params(teacher) / 1e9:.2f}e9 params: 2 B/param sharded over N",
                  f"    + in its forward: 2 B x {unsharded / 1e6:.0f}e6 unsharded (root + 2 layers)"]
    return "\n".join(lines)


def table(a, name: str) -> str:
    student, teacher, replicated = jobs(a)[name]
    limit = a.gpu_gib * (1 - a.headroom)
    cols = ("shards", "working", "activ", "logits", "teacher")
    head = f"{'N':>2} {'AC':>3} | " + " ".join(f"{c:>7}" for c in cols) + f" | {'total':>7}  fits"
    lines = [summary(name, student, teacher, replicated), head, "-" * len(head)]
    for ac in (False, True):
        for n in a.ranks:
            r = plan_row(student, teacher, replicated, n, ac, a)
            cells = " ".join(f"{r[c]:7.1f}" for c in cols)
            fits = "yes" if r["total"] <= limit else "no"
            lines.append(f"{n:>2} {'on' if ac else 'off':>3} | {cells} | {r['total']:7.1f}  {fits}")
    return "\n".join(lines)


def totals(a, names: list[str]) -> str:
    """One line per job and AC setting: the total per GPU for each N, marked when it does not fit."""
    limit = a.gpu_gib * (1 - a.headroom)
    head = f"{'job':<19} {'AC':>3} |" + "".join(f"{f'N={n}':>8}" for n in a.ranks)
    lines = [f"total GiB per GPU, * = over {limit:.0f} GiB", head, "-" * len(head)]
    for name in names:
        student, teacher, replicated = jobs(a)[name]
        for ac in (False, True):
            cells = ""
            for n in a.ranks:
                total = plan_row(student, teacher, replicated, n, ac, a)["total"]
                cells += f"{total:7.1f}" + ("*" if total > limit else " ")
            lines.append(f"{name:<19} {'on' if ac else 'off':>3} |{cells.rstrip()}")
    return "\n".join(lines)


def ranks_arg(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"rank counts must be >= 1, got {text!r}")
    return ranks


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--job", choices=["all", "teacher-sft", "student-sft", "distill", "distill-replicated", "load"],
      default="all", help="which plan to print: teacher SFT (teacher trained), student SFT, distillation with the "
                          "teacher sharded over the ranks or replicated on each, loading the teacher checkpoint")
    a("--teacher", choices=MODELS, default="llama-3.1-8b", help="teacher shape")
    a("--student", choices=MODELS, default="llama-3.2-3b", help="student shape")
    a("--ranks", type=ranks_arg, default=[1, 2, 4, 8], help="GPU counts (FSDP ranks) to plan for, comma-separated")
    a("--gpu-gib", type=float, default=80, help="memory per GPU, GiB")
    a("--headroom", type=float, default=0.1,
      help="fraction of --gpu-gib kept free for the CUDA context, NCCL and allocator fragmentation: "
           "fits means total <= (1 - headroom) * gpu-gib")
    a("--batch", type=int, default=8, help="sequences per rank per step (the paper's batch)")
    a("--seq", type=int, default=512, help="tokens per sequence, padding included (the paper's max length)")
    a("--answer-tokens", type=int, default=64, help="answer (labelled) tokens per sequence, where logits are built")
    a("--totals", action="store_true", help="print only the totals, one compact table for all jobs")
    a("--load-file", choices=sorted(DTYPE_BYTES), default="fp32",
      help="--job load: the checkpoint's dtype on disk (sft.py writes its fp32 master weights)")
    a("--load-kept", choices=sorted(DTYPE_BYTES), default="bf16",
      help="--job load: the dtype the loaded weights are kept in (a torchrun --dtype bf16 teacher: bf16)")
    args = p.parse_args()

    for key, s in MODELS.items():
        count = num_params(s)
        assert abs(count / PUBLISHED[key] - 1) < 0.01, (s.name, count)
        print(f"{s.name:<13} {count / 1e9:6.3f}e9 params, {layer_params(s) / 1e6:7.2f}e6 per layer, "
              f"{layer_act_bytes(s) / s.dim:4.1f}d = {layer_act_bytes(s)} B/token/layer of activations")
    print(f"\nGiB per GPU; batch {args.batch} x {args.seq} tokens per rank, {args.answer_tokens} answer tokens per "
          f"sequence; fits: total <= {args.gpu_gib * (1 - args.headroom):.0f} GiB of {args.gpu_gib:.0f}")
    names = list(jobs(args)) if args.job == "all" else [args.job] if args.job != "load" else []
    if args.totals:
        print("\n" + totals(args, names))
    else:
        for name in names:
            print("\n" + table(args, name))
    if args.job == "load" or (args.job == "all" and not args.totals):
        print("\n" + load_table(args))


if __name__ == "__main__":
    main()
