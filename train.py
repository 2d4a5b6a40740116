"""The training plumbing sft.py, distill.py and heal.py share: the answer-token loss, the one no-grad scoring pass,
the optimiser and lr schedule (the paper's AdamW(0.9, 0.95), clip 1.0, cosine with 10 % warmup), the batches of each
step, and the progress bar with metrics.jsonl.

Only answer tokens carry a loss. Every (N, ...) answer-position tensor is in row-major order: sample by sample,
positions in order (answer_positions). A step's loss is divided by the answer tokens of the whole step, over
micro-batches and ranks, so neither --grad-accum nor the number of torchrun ranks changes the gradient.
"""

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import runtime
from runtime import UserError, autocast

# -----------------------------------------------------------------------------
# data


def load_split(tok, args, split: str, limit: int = 0):
    """Examples and their encodings for one split; reports how many were truncated to --max-len. A jsonl split that
    --data names no file for is empty."""
    data_file = None
    if args.task == "jsonl":
        if not args.data:
            raise UserError("--task jsonl needs --data FILE (train[,val[,test]])")
        data_file = data.split_file(args.data, split)
        if data_file is None:
            return [], []
    examples = data.load_examples(args.task, split, data_dir=args.data_dir, data_file=data_file,
                                  limit=limit or None, seed=0,  # the same subset for teacher, student, every seed
                                  metric=getattr(args, "metric", None))
    items, n_trunc = data.encode_split(tok, examples, args.max_len, refuse_long=args.refuse_long)
    if n_trunc:
        runtime.print0(f"{args.task}/{split}: {n_trunc} of {len(examples)} examples truncated to --max-len "
                       f"{args.max_len}")
    return examples, items


def load_splits(tok, args, generation_flag: str, max_new_tokens: int):
    """(train examples, train items, val examples, val items) of a training run, refused when there is nothing to
    train on or when `generation_flag` caps generation on a task that generates nothing."""
    train_examples, train_items = load_split(tok, args, "train", args.train_size)
    val_examples, val_items = load_split(tok, args, "val", args.val_size)
    if not train_items:
        raise UserError(f"task {args.task}: the training split is empty")
    data.check_generation_flag(args.task, train_examples, generation_flag, max_new_tokens)
    return train_examples, train_items, val_examples, val_items


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

# -----------------------------------------------------------------------------
# the loss: answer tokens only


def answer_hidden(model, batch):
    """Hidden states at the positions that predict an answer token.

    Returns h (N, D), labels (N,), sample_idx (N,): N answer tokens over the batch; position t predicts token t+1.
    """
    h = model.hidden(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1, D)
    sel, labels, rows = answer_positions(batch["labels"])
    return h[sel], labels, rows


def answer_positions(labels: torch.Tensor):
    """Which of the (B, T-1) positions predict an answer token, and their labels (N,) and batch rows (N,), in
    row-major order: sample by sample, positions in order (the order of every (N, ...) answer-position tensor)."""
    target = labels[:, 1:]  # (B, T-1)
    sel = target != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(target)
    return sel, target[sel], rows[sel]


def answer_logits(model, batch):
    """fp32 logits (N, V) at answer positions only: the (B, T, V) logits of the full sequence are never built."""
    h, labels, rows = answer_hidden(model, batch)
    return model.lm_logits(h), labels, rows


def sft_loss_sum(model, batch):
    """Sum of answer-token CE over the batch (the caller divides by the global answer-token count)."""
    logits, labels, _ = answer_logits(model, batch)
    return F.cross_entropy(logits, labels, reduction="sum")


def n_answer_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def answer_batches(model, items: list[dict], pad_id: int, batch_size: int, device, dtype: str = "fp32",
                   by_length: bool = False, desc: str | None = None):
    """The one no-grad scoring pass: for each batch of `items`, yield (indices of its items, fp32 logits (N, V),
    labels (N,), rows (N,)) at the answer positions. by_length batches items of similar length (less padding);
    otherwise in order. The model is in eval mode while it runs."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"])) if by_length else range(len(items))
    order = list(order)
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[i:i + batch_size]
        batch = to_device(data.collate([items[k] for k in idx], pad_id), device)
        with autocast(device, dtype):
            logits, labels, rows = answer_logits(model, batch)  # (N, V), (N,), (N,)
        yield idx, logits, labels, rows
    model.train(was_training)


def eval_loss(model, items, pad_id, batch_size, device, dtype) -> float:
    """Token-mean answer CE over a list of encoded items.

    Under torchrun rank r scores items r, r + N, ... and the sums and counts are all-reduced: the value of one
    process, summed in another order. Every rank runs as many forwards as rank 0, whose share is the largest (under
    FSDP each forward is a collective); a rank with fewer items runs the rest on an item whose labels are all masked,
    which adds nothing."""
    share = items[runtime.rank()::runtime.world()]
    n_passes = math.ceil(len(items) / (runtime.world() * batch_size))
    idle = [{**items[0], "labels": [data.IGNORE] * len(items[0]["labels"])}] if items else []
    total, count, passes = 0.0, 0, 0
    for _, logits, labels, _ in answer_batches(model, share, pad_id, batch_size, device, dtype):
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += len(labels)
        passes += 1
    for _ in range(n_passes - passes):
        for _ in answer_batches(model, idle, pad_id, batch_size, device, dtype):
            pass
    return runtime.sum_float(total) / max(runtime.sum_int(count), 1)

# -----------------------------------------------------------------------------
# optimiser and schedule (paper: AdamW(0.9, 0.95), clip 1.0, cosine with 10 % warmup)


def make_optimizer(model, lr: float, weight_decay: float = 0.0):
    if runtime.is_sharded(model):  # a forward without backward leaves the FSDP root gathered: the optimiser must
        model.reshard()             # hold the shards, which model.parameters() gives only once resharded
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel exists on CPU and CUDA and is several times faster than the per-tensor loop
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`. `step` counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model, micro_batches, device, dtype: str, clip: float = 1.0):
    """One optimiser step over several micro-batches. Returns (token-mean loss, grad norm, answer tokens).

    The loss is divided by the answer tokens of the whole step on every rank (runtime.sum_int), and the ranks'
    gradients are summed, so neither --grad-accum nor the number of ranks changes the gradient."""
    n_tokens = runtime.sum_int(sum(n_answer_tokens(b) for b in micro_batches))  # global: accumulation-invariant
    total = 0.0
    for batch in micro_batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            loss = sft_loss_sum(model, batch) / max(n_tokens, 1)
        loss.backward()
        total += float(loss.detach())
    grad_norm = runtime.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    return runtime.sum_float(total), grad_norm, n_tokens


def apply_update(optimizer, lr: float, step: int, loss: float, grad_norm: float):
    """Refuse non-finite values before they reach the weights, then step."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise UserError(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                        f"(loss={loss}, grad_norm={grad_norm}); try a lower --lr or --dtype fp32. "
                        "No checkpoint was written for it")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

# -----------------------------------------------------------------------------
# the batches of a step, and progress


def build_batches(items, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """This epoch's optimiser steps, each a list of micro-batches (lists of item indices). Depends only on
    (seed, epoch), so a resumed run sees the same order. Under torchrun these are the global micro-batches
    (batch_size = --batch-size x ranks); rank_batch deals each one out."""
    lengths = [len(it["input_ids"]) for it in items]
    batches = data.length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch)
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def rank_batch(items: list[dict], indices: list[int], pad_id: int) -> dict:
    """This rank's share of a global micro-batch, dealt round-robin (rank r takes examples r, r + N, ...), so N ranks
    of batch b together see the batch of one process with --batch-size N*b. A short last batch can leave a rank
    with nothing: it then runs one of the examples with every label masked, because FSDP needs every rank in every
    forward and backward, and a batch with no answer tokens adds nothing to the loss or the gradient."""
    share = indices[runtime.rank()::runtime.world()]
    if share:
        return data.collate([items[i] for i in share], pad_id)
    batch = data.collate([items[indices[0]]], pad_id)
    batch["labels"].fill_(-100)
    batch["ids"] = []
    return batch

def run_length(items: list[dict], args) -> tuple[int, int, int]:
    """(global batch, optimiser steps per epoch, steps of --epochs or --max-steps) of a run over `items`: --batch-size
    is per rank, so the global batch is --batch-size x ranks."""
    global_batch = args.batch_size * runtime.world()
    steps_per_epoch = len(build_batches(items, global_batch, args.grad_accum, args.seed, 0))
    total = math.ceil(args.epochs * steps_per_epoch)
    return global_batch, steps_per_epoch, min(total, args.max_steps) if args.max_steps else total


def step_batches(items: list[dict], step: int, steps_per_epoch: int, global_batch: int, grad_accum: int, seed: int,
                 pad_id: int) -> list[dict]:
    """This rank's micro-batches of optimiser step `step` (counted over the whole run, from 0)."""
    epoch, k = divmod(step, steps_per_epoch)
    return [rank_batch(items, mb, pad_id) for mb in build_batches(items, global_batch, grad_accum, seed, epoch)[k]]


def idle_pass(student, teacher, batch: dict, device, dtype: str):
    """This rank's empty share of a short last batch (rank_batch): FSDP still needs every rank in the forwards of the
    student and of a sharded teacher, and in the backward. The batch has no answer tokens, so it adds 0."""
    batch = to_device(batch, device)
    teacher.idle(batch)
    with autocast(device, dtype):
        (sft_loss_sum(student, batch) * 0).backward()


class Progress:
    """A training loop's tqdm bar and metrics.jsonl: every `every` steps (and at `last`) one row with the tokens
    seen and the tokens per second since the previous row. Under torchrun rank 0 shows and writes."""

    def __init__(self, log, total: int, initial: int, desc: str, every: int, tokens_seen: int = 0):
        self.log, self.every, self.tokens_seen = log, every, tokens_seen
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not runtime.is_main())
        self.restart()

    def restart(self):
        """Start the tokens-per-second count afresh (after an evaluation, say)."""
        self.t_log, self.tok_log = time.perf_counter(), 0

    def update(self, step: int, micro: list[dict], row: dict, last: bool = False, **postfix) -> dict | None:
        """One optimiser step done: count the global batch's tokens; every `every` steps write `row` (its numbers
        come first) with tokens_seen and tok_per_s, and show `postfix`. Returns the row written, if any."""
        n = runtime.sum_int(sum(int(b["attention_mask"].sum()) for b in micro if b["ids"]))
        self.tokens_seen, self.tok_log = self.tokens_seen + n, self.tok_log + n
        self.bar.update(1)
        if step % self.every and not last:
            return None
        row = {**row, "tokens_seen": self.tokens_seen, "tok_per_s": self.tok_log / (time.perf_counter() - self.t_log)}
        self.log.log(row)
        self.bar.set_postfix(**{k: v(row) if callable(v) else v for k, v in postfix.items()},
                             tok_s=f"{row['tok_per_s']:.0f}")
        self.restart()
        return row

    def close(self):
        self.bar.close()


def expected_minutes(model, n_tokens: int, device, dtype: str) -> float:
    """Rough duration: 6·N·tokens FLOPs, N without the embeddings (the LM head runs only at answer positions), at
    half of a matmul throughput measured here for a moment."""
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = n * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    n_body = model.num_params() - model.model.embed_tokens.weight.numel()
    return 6 * n_body * n_tokens / (0.5 * flops) / 60
