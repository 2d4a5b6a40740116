"""Task evaluation of any HF-layout Llama model dir: the one implementation that sft.py's periodic validation,
distill.py's final evaluation and the experiment all call.

    python evaluate.py --model runs/distill/scd_aw/final --task ncbi_disease --split test

PubMedQA and JSONL files of metric choices are scored without generation: the label (yes/no/maybe, or the line's
options) with the highest log-probability after the assistant prefix is the prediction. NER tasks and the other JSONL
files generate greedily with the KV cache, in batches; the answer is parsed back into entity mentions and scored by
exact-span micro F1, or compared by exact match (data.score).
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import data
import hub
from generate import KVCache, RepeatStop, generate, left_pad
from model import load_model
from train import eval_loss
from runtime import (UserError, atomic_write_text, autocast, given_flags, resolve_device, resolve_dtype, run_cli,
                     single_process)

@torch.no_grad()
def label_logprobs(model, tok, examples, labels: list, batch_size: int, dtype: str = "fp32",
                   task: str = "pubmedqa", end: bool = False) -> torch.Tensor:
    """(n_examples, n_labels) summed log-probability of each label's answer tokens after the prompt.

    `labels` is one list for every example (PubMedQA's yes/no/maybe) or one list per example (the options of a
    multiple-choice exam), each written as `task` writes its answers (data.format_answer); a row with fewer options
    than the longest scores -inf in the missing columns. With `end`, the end-of-turn token after each label is
    scored too, so a label that is a prefix of another ("cancer", "cancer of the breast") does not win by being
    shorter.
    The prompt runs once for all labels: its last position scores every label's first token, and a label of
    several tokens continues from the prompt's KV cache (each label overwrites the previous one's slots; in a batch,
    shorter labels are padded at their end, which no earlier token attends to)."""
    device = model.model.embed_tokens.weight.device
    rows = labels if labels and isinstance(labels[0], (list, tuple)) else [labels] * len(examples)
    encoded = {lab: tok.encode(data.format_answer(task, lab)) + [tok.eos_id] * end
               for row in rows for lab in row}
    label_ids = [[encoded[lab] for lab in row] for row in rows]
    longest = max(len(ids) for ids in encoded.values())
    scores = torch.full((len(examples), max(map(len, rows))), float("-inf"))
    prompts = [data.encode_prompt(tok, ex) for ex in examples]
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ids, mask = left_pad(batch, tok.pad_id, device)  # every prompt ends at column T - 1
        B, T = ids.shape
        cache = KVCache(model.args, B, T + longest - 1, device, model.model.embed_tokens.weight.dtype) \
            if longest > 1 else None  # yes/no/maybe are one token each: no cache needed
        with autocast(device, dtype):
            h = model.hidden(ids, mask, cache=cache)[:, -1:]  # (B, 1, D), predicts each label's first token
        first = model.lm_logits(h).log_softmax(-1)  # (B, 1, V)
        next_pos = mask.sum(-1, keepdim=True)  # (B, 1) position of the first label token
        for j in range(scores.shape[1]):
            labs = [row[j] if j < len(row) else [] for row in label_ids[i:i + B]]
            n = torch.tensor([len(lab) for lab in labs], device=device)  # (B,)
            L = int(n.max())
            target = torch.tensor([lab + [tok.pad_id] * (L - len(lab)) for lab in labs], device=device)  # (B, L)
            logp = first
            if L > 1:
                cache.pos.fill_(T)  # every label overwrites the slots after the prompt
                positions = next_pos + torch.arange(L - 1, device=device)
                with autocast(device, dtype):
                    h = model.hidden(target[:, :-1], position_ids=positions, cache=cache)  # (B, L - 1, D)
                logp = torch.cat([first, model.lm_logits(h).log_softmax(-1)], 1)  # (B, L, V)
            token_logp = logp.gather(-1, target[..., None]).squeeze(-1)  # (B, L)
            real = torch.arange(L, device=device) < n[:, None]
            total = torch.where(real, token_logp, 0.0).sum(-1)
            scores[i:i + B, j] = torch.where(n > 0, total, float("-inf")).cpu()
    return scores


LOOKAHEAD = 8  # prompt-lookup guesses per generation step (generate.generate): outputs that copy or repeat need fewer


@torch.no_grad()
def generate_answers(model, tok, examples, batch_size: int, max_new_tokens: int, dtype: str = "fp32",
                     progress: bool = False, stop_repeats: bool = False) -> tuple[list[str], int]:
    """Greedy answers, batched by prompt length so little of each batch is padding; with stop_repeats each answer
    stops at the first line it repeats (generate.RepeatStop). Returns the answers and how many the decoder stopped."""
    device = model.model.embed_tokens.weight.device
    prompts = [data.encode_prompt(tok, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    stop = RepeatStop(tok) if stop_repeats else None
    for i in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[i:i + batch_size]
        with autocast(device, dtype):
            outs = generate(model, [prompts[k] for k in idx], max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            lookahead=LOOKAHEAD, stop=stop)
        for k, out in zip(idx, outs):
            answers[k] = tok.decode(out).strip()
    return answers, stop.stopped if stop is not None else 0


def evaluate(model, tok, task: str, examples, batch_size: int = 16, max_new_tokens: int | None = None,
             dtype: str = "fp32", progress: bool = False, stop_repeats: bool = False) -> tuple[dict, list[dict]]:
    """Task metrics ({"main": ..., ...}) and per-sample rows (id, prediction, gold, correct).
    max_new_tokens defaults to the task's cap (a little above its longest gold answer). With stop_repeats a generated
    answer ends before its first repeated line, and the metrics count how many did ("stopped")."""
    max_new_tokens = max_new_tokens or data.get_task(task).max_new_tokens
    was_training = model.training
    model.eval()
    kind = data.answer_kind(task, examples)
    if kind == "choices":  # no generation: the option with the highest log-probability is the answer
        options = [list(ex.choices) for ex in examples]
        # PubMedQA's one-word labels are no prefix of each other, so they are scored without the end-of-turn token
        # (as the committed results were); a user's options may be ("cancer", "cancer of the breast"): theirs end
        # with it
        scores = label_logprobs(model, tok, examples, options, batch_size, dtype, task, end=task != "pubmedqa")
        predictions = [opts[k] for opts, k in zip(options, scores.argmax(-1).tolist())]
    else:
        predictions, n_stopped = generate_answers(model, tok, examples, batch_size, max_new_tokens, dtype, progress,
                                                  stop_repeats)
    model.train(was_training)
    if stop_repeats and kind != "choices":  # the last line too: the decoder stops only at a line's end
        n_stopped += sum(data.cut_repeats(p) != p for p in predictions)
        predictions = [data.cut_repeats(p) for p in predictions]
    metrics = data.score(task, examples, predictions)
    if stop_repeats and kind != "choices":
        metrics["stopped"] = n_stopped
    rows = []
    for ex, pred in zip(examples, predictions):
        parsed = data.parse_answer(task, pred, kind)
        gold = ex.gold if ex.gold is not None else data.normalise(ex.answer)
        rows.append({"id": ex.id, "prediction": pred, "gold": gold, "correct": data.answers_match(parsed, gold)})
    return metrics, rows


def validate(model, tok, args, val_examples, val_items, device, loss_only: bool = False) -> dict:
    """A training run's validation: the val loss (train.eval_loss, split over the ranks under torchrun) and, unless
    loss_only, the task metric on the validation examples (every rank decodes them all: a sharded model's decode
    loop is a collective whose length depends on the answers)."""
    model.eval()
    out = {"val_loss": eval_loss(model, val_items, tok.pad_id, args.eval_batch_size, device, args.dtype)}
    if val_examples and not loss_only:
        metrics, _ = evaluate(model, tok, args.task, val_examples, batch_size=args.eval_batch_size,
                              max_new_tokens=args.eval_max_new_tokens or None, dtype=args.dtype,
                              stop_repeats=args.stop_repeats)
        out["val_metric"] = metrics["main"]
        out["val_metrics"] = metrics
    model.train()
    return out


def evaluate_dir(model_dir, task: str, split: str, data_dir=None, data_file=None, limit: int = 0,
                 batch_size: int = 16, max_new_tokens: int | None = None, device: str = "cpu",
                 dtype: str = "fp32", out=None, progress: bool = True, metric: str | None = None,
                 stop_repeats: bool = False) -> dict:
    """Load a model dir, evaluate it on a split, write metrics + predictions atomically, return the metrics.
    `metric` is jsonl's --metric (None: the file says)."""
    model_dir = Path(model_dir)
    tok = data.load_tokenizer(model_dir)
    examples = data.load_examples(task, split, data_dir=data_dir, data_file=data_file, limit=limit or None,
                                  metric=metric)
    if not examples:
        raise UserError(f"task {task}: split {split!r} is empty")
    data.check_generation_flag(task, examples, "--max-new-tokens", max_new_tokens)
    model = load_model(model_dir, device=device)
    metrics, rows = evaluate(model, tok, task, examples, batch_size, max_new_tokens, dtype, progress, stop_repeats)
    metrics = {"task": task, "split": split, "n": len(examples), "model": str(model_dir), **metrics}
    out = Path(out) if out else model_dir / f"eval_{task}_{split}.json"
    # predictions first: the metrics file marks the evaluation done (experiment.py reuses it), so it comes last
    atomic_write_text(out.with_suffix(".predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv=None):
    single_process("evaluate.py")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF Llama model dir (e.g. runs/student/step_000100) or Hugging Face "
                                                 "id (owner/name[@revision])")
    p.add_argument("--task", default="ncbi_disease", help="ncbi_disease, bc5cdr, pubmedqa or jsonl")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split to score")
    p.add_argument("--data", default=None, help="--task jsonl: the JSONL file to score, or train,val,test files "
                                                "of which --split picks one")
    p.add_argument("--metric", choices=data.METRICS, default=None,
                   help="how --task jsonl is scored when the file does not say (see data.py)")
    p.add_argument("--data-dir", default=None, help="directory with the built-in tasks' files (default "
                                                    "../shared/data)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N examples (0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward/generation batch")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generation length cap (0 = the task's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32, bf16 autocast, or auto (bf16 where the hardware has bf16 matmuls)")
    p.add_argument("--stop-repeats", action="store_true",
                   help="end a generated answer before the first line it repeats (a greedy loop), as deployed "
                        "NER-by-generation does; the metrics count the answers stopped")
    p.add_argument("--out", default=None, help="metrics JSON path (default MODEL/eval_TASK_SPLIT.json); "
                                               "predictions go beside it as .predictions.jsonl")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.max_new_tokens < 0 or args.limit < 0:
        raise UserError("--batch-size must be positive, --max-new-tokens and --limit >= 0")
    data.check_task_flags(args.task, args.data, args.data_dir, args.metric)
    data_file = None
    if args.task == "jsonl":
        files = args.data.split(",")
        if len(files) == 1 and "split" in given_flags(p, argv):
            raise UserError(f"--split {args.split}: --data {args.data} is one file, scored whatever the split; drop "
                            "--split, or pass train,val,test files for it to pick from")
        # one file is scored as it is; of train,val,test files, --split's comes with the training file's header
        data_file = files[0] if len(files) == 1 else data.split_file(args.data, args.split)
        if not data_file:
            raise UserError(f"--split {args.split}: --data {args.data} has no {args.split} file")
    hub.resolve_args(args, ("model",), {"model"})
    device = resolve_device(args.device)
    metrics = evaluate_dir(args.model, args.task, args.split, args.data_dir, data_file, args.limit,
                           args.batch_size, args.max_new_tokens, device, resolve_dtype(args.dtype, device), args.out,
                           metric=args.metric, stop_repeats=args.stop_repeats)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_cli(main)
