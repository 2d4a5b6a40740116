"""The student, made the way Llama 3.2 1B/3B were made: prune the base teacher's layers, then heal the pruned model
by distilling the base teacher into it on unlabeled in-domain text.

    python heal.py                                  # models/teacher -> models/student (15 of 30 layers, healed)
    python heal.py --prune every_other --tokens 100000 --out runs/heal_every_other --export models/student_eo
    python heal.py --prune angular --tokens 0       # prune only: held-out perplexity of the unhealed student

Which layers go is a measured choice (--prune):
    every_other      evenly spaced layers kept, the first and the last included (prepare.keep_layers)
    angular          drop the contiguous block of n layers whose input and output hidden states are closest:
                     argmin_l  E_t[ arccos(cos(x_l,t, x_(l+n),t)) / π ]   (Gromov et al. 2024, "The Unreasonable
                     Ineffectiveness of the Deeper Layers"), x_l the input of layer l, every token of the corpus
    block_influence  drop the n layers with the smallest Block Influence BI_i = 1 − E_t[cos(x_i,t, x_(i+1),t)]
                     (ShortGPT, Men et al. 2024): the layers that change their input least, not necessarily adjacent

Healing is forward KL(p_teacher ‖ p_student) over the full vocabulary at every position of packed fixed-length
sequences (texts joined by the end-of-turn token), computed by losses.py's divergence in fp32 log-space and sliced
over tokens, with train.py's optimiser and lr schedule and checkpoints.py's checkpoints and resume. The teacher is
the *base* model, not an SFT'd one: healing restores language, the task is learnt later by SFT and distillation.

The corpus is the text of the training splits only: NCBI-disease and BC5CDR training sentences and the contexts of
PubMedQA's training questions. A training text that equals any validation or test text of any of the three tasks is
dropped. Held-out perplexity is measured on NCBI-disease devel text, before and during healing, and for the teacher.

Output: --out (run dir: step_XXXXXX/ resume checkpoints, metrics.jsonl, config.json) and --export, an HF-layout model
dir with README.md and heal.json saying how it was made (layers kept, corpus, tokens, the perplexity curve).
"""

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import hub
import prepare
import runtime
from checkpoints import (MetricsLog, drop_older, latest_resumable, load_resume_state, model_fingerprint,
                         prepare_out_dir, save_checkpoint)
from losses import token_ce, token_losses
from model import load_model, save_model
from runtime import UserError, atomic_dir, atomic_write_text, run_cli
from train import apply_update, lr_at, make_optimizer

PRUNES = ("every_other", "angular", "block_influence")
CORPUS = {"ncbi_disease": "training sentences", "bc5cdr": "training sentences",
          "pubmedqa": "contexts of the training questions"}
HELD_OUT = ("ncbi_disease", "val")  # NCBI-disease devel sentences

# -----------------------------------------------------------------------------
# the corpus: training-split text only


def task_texts(task: str, split: str, data_dir=None) -> list[str]:
    """Plain text of one split: NER sentences (tokens joined by spaces, as the prompts show them), or each PubMedQA
    question's context paragraphs."""
    examples = data.load_examples(task, split, data_dir=data_dir)
    if task == "pubmedqa":  # the prompt is the context, a blank line, then the question
        return [ex.prompt.split("\n\nQuestion: ")[0] for ex in examples]
    return [ex.prompt.removeprefix("Sentence: ").split("\n\n")[0] for ex in examples]


def corpus_texts(data_dir=None) -> list[str]:
    """Training-split text of every built-in task, minus any text that also occurs in a validation or test split
    (the NER corpora come from overlapping PubMed abstracts). Order: by task, then file order."""
    held_out = {t for task in CORPUS for split in ("val", "test") for t in task_texts(task, split, data_dir)}
    return [t for task in CORPUS for t in task_texts(task, "train", data_dir) if t not in held_out]


def load_corpus(tok, args) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The training texts, packed into rows (n, --seq-len), and the held-out rows for perplexity."""
    texts = corpus_texts(args.data_dir)
    corpus = pack(texts, tok, args.seq_len)
    if len(corpus) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size}: the corpus has only {len(corpus)} rows of --seq-len "
                        f"{args.seq_len} tokens")
    held_out = pack(task_texts(*HELD_OUT, args.data_dir), tok, args.seq_len)[:max(1, args.eval_tokens // args.seq_len)]
    return texts, corpus, held_out


def pack(texts: list[str], tok, seq_len: int) -> torch.Tensor:
    """Token ids (n, seq_len): the texts' tokens joined by the end-of-turn token, cut into full rows (the tail that
    does not fill a row is dropped)."""
    ids = []
    for t in texts:
        ids += tok.encode(t) + [tok.eos_id]
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"the corpus has {len(ids)} tokens, fewer than one --seq-len {seq_len} row")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)

# -----------------------------------------------------------------------------
# which layers to drop


@torch.no_grad()
def layer_states(model, rows: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states x_0..x_L (each (n_tokens, D), fp32) of every row: x_l is the input of layer l, x_L the last
    layer's output before the final norm."""
    states = [[] for _ in range(model.args.n_layers + 1)]
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: states[0].append(o.float().flatten(0, 1)))]
    for l, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, l=l: states[l + 1].append(o.float().flatten(0, 1))))
    try:
        model.hidden(rows)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in states]


def angular_distances(states: list[torch.Tensor], n: int) -> list[float]:
    """d(l) = E_t[arccos(cos(x_l,t, x_(l+n),t)) / π] for l = 0..L−n: how far n consecutive layers from l move a
    token."""
    return [float(torch.arccos(torch.cosine_similarity(states[l], states[l + n], dim=-1).clamp(-1, 1)).mean()
                  / math.pi) for l in range(len(states) - n)]


def block_influence(states: list[torch.Tensor]) -> list[float]:
    """BI_i = 1 − E_t[cos(x_i,t, x_(i+1),t)] for each layer i: how much layer i changes its input."""
    return [float(1 - torch.cosine_similarity(states[i], states[i + 1], dim=-1).mean())
            for i in range(len(states) - 1)]


def choose_layers(method: str, n_layers: int, n_keep: int,
                  states: list[torch.Tensor] | None = None) -> tuple[list[int], dict]:
    """(kept layer indices, the scores behind the choice) for --prune `method`."""
    if not 2 <= n_keep <= n_layers:
        raise UserError(f"--layers {n_keep}: must be between 2 and the teacher's {n_layers} layers")
    n_drop = n_layers - n_keep
    if method == "every_other":
        return prepare.keep_layers(n_layers, n_keep), {}
    if method == "angular":
        d = angular_distances(states, n_drop) if n_drop else [0.0]
        start = min(range(len(d)), key=lambda l: (d[l], l))
        return [i for i in range(n_layers) if not start <= i < start + n_drop], {"angular_distance": d,
                                                                                 "dropped_block_start": start}
    bi = block_influence(states)
    drop = set(sorted(range(n_layers), key=lambda i: (bi[i], i))[:n_drop])
    return [i for i in range(n_layers) if i not in drop], {"block_influence": bi}

# -----------------------------------------------------------------------------
# healing


def heal_loss_sum(student, teacher, rows: torch.Tensor, device, dtype: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Σ over every position of KL(p_teacher ‖ p_student) (full vocabulary, T = 1) and of the student's next-token
    CE (for the log), and the position count. The caller divides by the global count."""
    with torch.no_grad(), runtime.autocast(device, dtype):
        teacher_logits = teacher(rows).flatten(0, 1)  # (N, V) fp32
    labels = torch.cat([rows[:, 1:], torch.full_like(rows[:, :1], data.IGNORE)], 1).flatten()  # last: no next token
    with runtime.autocast(device, dtype):
        h = student.hidden(rows).flatten(0, 1)  # (N, D)
        kd, ce = token_losses(h, student.lm_logits, teacher_logits, labels, "fkl")
    return kd.sum(), ce.sum(), rows.numel()


def heal_step(student, teacher, rows: torch.Tensor, device, dtype: str) -> tuple[float, float, float]:
    """Gradients of one healing step: token-mean forward KL from the teacher; (KL, CE, gradient norm)."""
    kd_sum, ce_sum, n = heal_loss_sum(student, teacher, rows, device, dtype)
    (kd_sum / n).backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0))
    n_next = n - rows.shape[0]  # the CE has no label at each row's last position; the KL is taken there too
    return float(kd_sum.detach()) / n, float(ce_sum.detach()) / n_next, grad_norm


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int, device, dtype: str) -> float:
    """exp of the mean next-token CE over every predicted position of `rows` (n, L)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size].to(device)
        with runtime.autocast(device, dtype):
            h = model.hidden(x)[:, :-1].flatten(0, 1)
            ce = token_ce(h, x[:, 1:].flatten(), model.lm_logits, model.args.vocab_size)
        total, count = total + float(ce.sum()), count + ce.numel()
    model.train(was_training)
    return math.exp(total / max(count, 1))


def resume(student, out: Path, log, args, device):
    """(student, optimizer, step, seconds, perplexity curve): afresh, or from --out's newest checkpoint (--resume)."""
    found = latest_resumable(out) if args.resume else None
    if args.resume and found is None:
        raise UserError(f"--resume: {out} has no complete checkpoint with resume state; start over with --overwrite")
    if found is None:
        return student, make_optimizer(student, args.lr, args.weight_decay), 0, 0.0, []
    step, path = found
    student = load_model(path, device=device)
    optimizer = make_optimizer(student, args.lr, args.weight_decay)
    info = load_resume_state(path, student, optimizer)
    log.truncate_after(step)
    print(f"resuming from {path} (step {step})")
    return student, optimizer, step, info["seconds"], info["curve"]


def export(path: Path, student, tok, info: dict):
    """The healed student as an HF-layout dir with README.md and heal.json, written whole or not at all."""
    with atomic_dir(path) as tmp:
        save_model(student, tmp, dtype=torch.float32)
        for f in tok.files:
            (tmp / f.name).write_bytes(f.read_bytes())
        (tmp / "heal.json").write_text(json.dumps(info, indent=2) + "\n")
        curve = "\n".join(f"| {c['tokens']:,} | {c['perplexity']:.1f} | {c['seconds']:.0f} |" for c in info["curve"])
        (tmp / "README.md").write_text(
            f"# Pruned and healed student\n\n"
            f"Made by `heal.py` from `{info['teacher']}`: layers {info['kept_layers']} of {info['teacher_layers']} "
            f"kept (`--prune {info['prune']}`), {info['num_params']:,} parameters, then healed by forward KL from the "
            f"base teacher over the full vocabulary at every position, on {info['tokens_trained']:,} tokens of "
            f"unlabeled in-domain text ({info['corpus']['texts']:,} texts, {info['corpus']['tokens']:,} tokens: "
            f"{'; '.join(f'{k} {v}' for k, v in CORPUS.items())}; no validation or test text).\n\n"
            f"Held-out perplexity (NCBI-disease devel text, {info['held_out_tokens']:,} tokens): "
            f"{info['perplexity_before']:.1f} after pruning, {info['perplexity_after']:.1f} after healing; the "
            f"teacher's is {info['perplexity_teacher']:.1f} "
            f"({info['perplexity_after'] / info['perplexity_teacher']:.2f}×)."
            f"\n\n| tokens | perplexity | seconds |\n|---|---|---|\n{curve}\n\n{prepare.QUANT_NOTE}\n")


def measure_and_choose(teacher, corpus: torch.Tensor, args, device) -> tuple[list[int], dict]:
    """The layers to keep: --prune's scores on the hidden states of --calib-rows random corpus rows."""
    g = torch.Generator().manual_seed(args.seed)
    calib = corpus[torch.randperm(len(corpus), generator=g)[:args.calib_rows]].to(device)
    with runtime.autocast(device, args.dtype):
        states = layer_states(teacher, calib) if args.prune != "every_other" else None
    return choose_layers(args.prune, teacher.args.n_layers, args.layers, states)


def check_export(args):
    export_dir = Path(args.export) if args.export else None
    if export_dir and export_dir.exists() and not (export_dir / "heal.json").exists() and not args.overwrite:
        raise UserError(f"--export {export_dir}: exists and was not made by heal.py (no heal.json); move it away or "
                        "pass --overwrite to replace it")


def run_config(args, device, corpus: torch.Tensor, held_out: torch.Tensor) -> dict:
    """The resolved flags and the content of every input, so --resume refuses a retrained teacher or changed text
    by name."""
    return {**vars(args), "device": str(device),
            "inputs": {"teacher": model_fingerprint(args.teacher),
                       "corpus": hashlib.sha256(corpus.numpy().tobytes()).hexdigest()[:16],
                       "held_out": hashlib.sha256(held_out.numpy().tobytes()).hexdigest()[:16]}}


def heal(args) -> Path:
    device = runtime.resolve_device(args.device)
    args.dtype = runtime.resolve_dtype(args.dtype, device)
    check_export(args)
    runtime.seed_everything(args.seed)
    tok = data.load_tokenizer(args.teacher)
    texts, corpus, held_out = load_corpus(tok, args)
    config = run_config(args, device, corpus, held_out)
    teacher = load_model(args.teacher, device=device).requires_grad_(False).eval()
    kept, scores = measure_and_choose(teacher, corpus, args, device)
    out = prepare_out_dir(args.out, config, args.resume, args.overwrite)  # only once all inputs are good
    student = prepare.prune_layers(teacher, kept).to(device)
    print(f"heal: --prune {args.prune} keeps layers {kept} of {teacher.args.n_layers}, "
          f"{student.num_params():,} parameters; corpus {len(texts):,} texts, {corpus.numel():,} tokens "
          f"({len(corpus)} rows of {args.seq_len}); held-out {held_out.numel():,} tokens; {args.dtype} on {device}")

    steps_per_epoch = len(corpus) // args.batch_size
    total = math.ceil(args.tokens / (args.batch_size * args.seq_len))
    warmup = int(args.warmup * total)
    eval_every = max(1, math.ceil(total / args.evals)) if total else 1
    log = MetricsLog(out / "metrics.jsonl")
    student, optimizer, step, seconds, curve = resume(student, out, log, args, device)
    ppl_teacher = perplexity(teacher, held_out, args.batch_size, device, args.dtype)
    if not curve:
        curve.append({"step": 0, "tokens": 0, "seconds": 0.0,
                      "perplexity": perplexity(student, held_out, args.batch_size, device, args.dtype)})
        log.log({"step": 0, "eval": True, "perplexity": curve[0]["perplexity"], "perplexity_teacher": ppl_teacher})
    print(f"held-out perplexity: teacher {ppl_teacher:.1f}, student {curve[-1]['perplexity']:.1f} at step {step}; "
          f"healing {total} steps x {args.batch_size} x {args.seq_len} tokens")

    student.train()
    bar = tqdm(total=total, initial=step, desc=f"heal {args.prune}", dynamic_ncols=True)
    t0 = time.perf_counter() - seconds
    try:
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            rows = corpus[order[k * args.batch_size:(k + 1) * args.batch_size]].to(device)
            kl, ce, grad_norm = heal_step(student, teacher, rows, device, args.dtype)
            lr = lr_at(step, total, warmup, args.lr)
            apply_update(optimizer, lr, step, kl, grad_norm)
            step += 1
            bar.update(1)
            seconds = time.perf_counter() - t0
            row = {"step": step, "tokens": step * rows.numel(), "kl": kl, "ce": ce, "lr": lr, "grad_norm": grad_norm,
                   "tok_per_s": step * rows.numel() / seconds}
            if step % args.log_every == 0 or step == total:
                log.log(row)
            bar.set_postfix(kl=f"{row['kl']:.3f}", ce=f"{row['ce']:.3f}", tok_s=f"{row['tok_per_s']:.0f}")
            if step % eval_every == 0 or step == total:
                ppl = perplexity(student, held_out, args.batch_size, device, args.dtype)
                seconds = time.perf_counter() - t0  # the curve's time counts training and these evaluations
                curve.append({"step": step, "tokens": row["tokens"], "seconds": round(seconds, 1), "perplexity": ppl})
                log.log({"step": step, "eval": True, "perplexity": ppl, "seconds": seconds})
                save_checkpoint(out, step, student, tok, {"step": step, "perplexity": ppl, "kept_layers": kept},
                                    train_state={"seconds": seconds, "curve": curve}, optimizer=optimizer)
                drop_older(out, step)
                tqdm.write(f"step {step}: {row['tokens']:,} tokens, held-out perplexity {ppl:.1f} "
                           f"({ppl / ppl_teacher:.2f}x the teacher), {seconds / 60:.1f} min")
    finally:
        bar.close()

    info = {"teacher": str(args.teacher), "teacher_layers": teacher.args.n_layers, "prune": args.prune,
            "kept_layers": kept, "scores": scores, "num_params": student.num_params(),
            "corpus": {"tasks": CORPUS, "texts": len(texts), "tokens": corpus.numel()},
            "tokens_trained": step * args.batch_size * args.seq_len, "seq_len": args.seq_len,
            "held_out": "ncbi_disease devel sentences", "held_out_tokens": held_out.numel(),
            "perplexity_before": curve[0]["perplexity"], "perplexity_after": curve[-1]["perplexity"],
            "perplexity_teacher": ppl_teacher, "curve": curve, "seconds": round(seconds, 1), "config": config}
    atomic_write_text(out / "heal.json", json.dumps(info, indent=2) + "\n")
    if args.export:
        export(Path(args.export), student, tok, info)
    print(f"done: held-out perplexity {info['perplexity_before']:.1f} -> {info['perplexity_after']:.1f} "
          f"(teacher {ppl_teacher:.1f}) in {seconds / 60:.1f} min" + (f" -> {args.export}" if args.export else ""))
    return Path(args.export) if args.export else out


def main(argv=None):
    runtime.single_process("heal.py")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--teacher", default="models/teacher",
      help="the base teacher (HF dir or Hugging Face id) to prune and to heal from")
    a("--prune", choices=PRUNES, default="block_influence",
      help="which layers to drop (see the module docstring); block_influence measured best on SmolLM2-135M "
           "(docs/models.md)")
    a("--layers", type=int, default=15, help="teacher layers the student keeps")
    a("--tokens", type=int, default=300_000, help="healing budget in training tokens (0: prune only)")
    a("--seq-len", type=int, default=256, help="tokens per packed sequence")
    a("--batch-size", type=int, default=8, help="sequences per optimiser step")
    a("--lr", type=float, default=5e-4, help="peak learning rate (cosine over the whole budget, --warmup first)")
    a("--warmup", type=float, default=0.05, help="warmup as a fraction of the budget")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--calib-rows", type=int, default=64, help="corpus rows whose hidden states choose the layers")
    a("--eval-tokens", type=int, default=32768, help="held-out tokens for perplexity")
    a("--evals", type=int, default=8, help="held-out evaluations (and resume checkpoints) over the budget")
    a("--out", default="runs/heal", help="run dir: checkpoints, metrics.jsonl, heal.json")
    a("--export", default="models/student", help="where the healed student goes (HF dir); '' for none")
    a("--data-dir", default=None, help="directory with the built-in tasks' files (default: ../shared/data)")
    a("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="fp32, bf16 autocast, or auto")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a("--seed", type=int, default=0, help="seed of the calibration rows and the data order")
    a("--log-every", type=int, default=5, help="optimiser steps between metrics.jsonl lines")
    a("--resume", action="store_true", help="continue from the last checkpoint in --out")
    a("--overwrite", action="store_true", help="delete what --out holds and start over, and replace an --export dir "
                                                "heal.py did not make")
    args = p.parse_args(argv)
    for flag in ("seq_len", "batch_size", "calib_rows", "eval_tokens", "evals", "log_every", "layers"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.tokens < 0 or args.lr <= 0 or not 0 <= args.warmup < 1:
        raise UserError("--tokens must be >= 0, --lr positive and --warmup in [0, 1)")
    hub.resolve_args(args, ("teacher",), runtime.given_flags(p, argv))
    heal(args)


if __name__ == "__main__":
    run_cli(main)
