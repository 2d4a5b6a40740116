"""Decoding: a KV cache, greedy or nucleus sampling, and prompt-lookup decoding (the model itself is in model.py).

Every answer the evaluation scores is generated here (evaluate.py), so the decoder's speed is the evaluation's:
finished rows leave the batch, single-query attention runs as two small matmuls, and greedy decoding checks the
tokens an answer copies from its prompt several at a time (prompt lookup), with the same output as one at a time.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import ModelArgs


class KVCache(nn.Module):
    """Preallocated keys/values for every layer, which slots hold real (non-pad) tokens, and how many slots each row
    has filled. Rows may fill at different rates: with prompt lookup (`generate`) each row keeps its own number of
    tokens per pass, and a row's stale slots past `pos` are overwritten by its next tokens."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # per row: slots filled so far
        self.slots, self.end = None, 0  # set by begin() for the pass in flight: (B, T) slots, max + 1

    def begin(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None):
        """A new pass of T tokens per row: place them in each row's next slots and return the attention mask
        (B, 1, T, S) and the position ids (None: the model counts them from the attention mask)."""
        T = input_ids.shape[1]
        slots = self.pos[:, None] + torch.arange(T, device=input_ids.device)  # (B, T) each new token's slot
        if position_ids is None and attention_mask is None:
            position_ids = slots
        real = torch.ones_like(slots, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.valid.scatter_(1, slots, real)
        self.slots, self.end = slots, int(slots.max()) + 1
        k_slot = torch.arange(self.end, device=input_ids.device)
        # a query sees the real tokens up to its own slot, and always itself (so all-pad rows do not give NaN)
        mask = ((k_slot <= slots[..., None]) & self.valid[:, None, :self.end]) | (k_slot == slots[..., None])
        self.pos = self.pos + T
        return mask[:, None], position_ids

    def attend(self, layer: int, q, k, v, mask):
        """Attention of this pass's queries q (B, H, T, hd) over the cached and new keys and values."""
        k, v = self.update(layer, k, v)  # (B, Hkv, S, hd), S = cached + T
        if q.shape[2] == 1:  # one new token per row
            return decode_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        idx = self.slots[:, None, :, None].expand_as(k)  # k, v (B, Hkv, T, hd) go to their rows' own slots
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))  # bf16 under autocast, into the cache's own dtype
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.end], self.v[layer, :, :, :self.end]

    def keep(self, rows: torch.Tensor):
        """Drop every batch row not in `rows` (finished sequences), copying only the slots filled so far."""
        S = int(self.pos.max())
        k = self.k.new_zeros(self.k.shape[0], len(rows), *self.k.shape[2:])
        v = torch.zeros_like(k)
        k[:, :, :, :S], v[:, :, :, :S] = self.k[:, rows, :, :S], self.v[:, rows, :, :S]
        self.k, self.v, self.valid, self.pos = k, v, self.valid[rows], self.pos[rows]



def decode_attention(q, k, v, mask):
    """Attention of one query per row: q (B, H, 1, hd), k/v (B, Hkv, S, hd), mask (B, 1, 1, S) -> (B, H, 1, hd).
    Two small matmuls in fp32: SDPA's CPU kernel is tiled for long queries and slow on a single one
    (bench/decode.py)."""
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    # query heads h*G .. h*G+G-1 share kv head h (G = H / Hkv), the grouping SDPA's enable_gqa uses
    scores = q.float().view(B, Hkv, H // Hkv, hd) @ k.float().transpose(-1, -2) * hd ** -0.5  # (B, Hkv, G, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(v.dtype).view(B, H, 1, hd)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits (B, V) -> next token (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T) and bool attention mask (B, T), padded on the left so every prompt ends at T - 1."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = True
    return ids.to(device), mask.to(device)


def lookup_guesses(seq: torch.Tensor, length: torch.Tensor, first: torch.Tensor, k: int, ngram: int,
                   fill: int) -> tuple[torch.Tensor, int]:
    """Prompt lookup: for each row of seq (b, L), whose real tokens are columns first..length-1, guess the k tokens
    that followed the earliest occurrence of its last n tokens, for the longest n in ngram..2 that occurs before
    them. One token is too weak a cue: in NER answers it mostly guesses the sentence's next words, which cost a
    wider pass and are rejected.
    Returns guesses (b, w), `fill` where a row has none, and w <= k: as wide as the longest guess, 0 if none."""
    b, L = seq.shape
    guesses, width = seq.new_full((b, k), fill), seq.new_zeros(b)
    cols = torch.arange(L, device=seq.device)
    for n in range(ngram, 1, -1):
        if L < n + 1:
            continue
        tail = seq.gather(1, (length[:, None] - n + cols[:n]).clamp(min=0))  # (b, n) each row's last n tokens
        hit = (seq.unfold(1, n, 1) == tail[:, None]).all(-1)  # (b, L - n + 1): window i is seq[:, i:i+n]
        start = cols[:L - n + 1]
        hit &= (start >= first[:, None]) & (start + n < length[:, None])  # real, and ends before the last token
        at = torch.where(hit, start, L).min(-1).values  # the earliest occurrence (the most tokens follow it), L if none
        use = (at < L) & (width == 0)
        src = at[:, None] + n + cols[:k]  # (b, k) the columns that followed it
        got = (src < length[:, None]) & use[:, None]
        guesses = torch.where(got, seq.gather(1, src.clamp(max=L - 1)), guesses)
        width = torch.where(use, got.sum(-1), width)
    w = int(width.max())
    return guesses[:, :w], w


class RepeatStop:
    """Stops an answer at the first line it repeats, as NER-by-generation systems do: a greedy answer that writes a
    mention line a second time has entered a loop that would run to the token cap. The answer ends before the
    repeated line.

    The rule is data.cut_repeats, applied to the whole lines decoded so far (those ended by a token whose text holds
    a line break); the row stops where the kept text ends. Where that falls inside a token (a line break in the
    middle of one), the decoder goes on and the evaluation cuts the text afterwards."""

    def __init__(self, tok):
        self.decode, self.stopped = tok.decode, 0  # rows stopped so far
        texts = tok.tk.decode_batch([[i] for i in range(tok.vocab_size)], skip_special_tokens=False)
        self.newline_ids = torch.tensor([i for i, t in enumerate(texts) if "\n" in t])

    def cut(self, tokens: list[int]) -> int | None:
        """How many of `tokens` come before the first whole line that repeats an earlier one, or None."""
        newlines = set(self.newline_ids.tolist())
        ends = [j + 1 for j, t in enumerate(tokens) if t in newlines]  # token counts that end a line
        if not ends:
            return None
        text = self.decode(tokens[:ends[-1]])
        kept = data.cut_repeats(text)
        if kept == text:
            return None
        return next((e for e in reversed(ends) if self.decode(tokens[:e]).strip() == kept), None)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id, pad_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0, generator=None, lookahead: int = 0,
             ngram: int = 3, stop: RepeatStop | None = None) -> list[list[int]]:
    """Batched generation with a KV cache. Prompts are left-padded; returns the new tokens of each prompt,
    stopped at (and without) the first eos. `eos_id` is an int or a collection of ints (Llama-3 has several).
    A row that stops leaves the batch, so the rows still running are not slowed by finished ones.

    Greedy decoding (temperature 0) with lookahead > 0 checks up to `lookahead` guessed tokens per forward pass
    (prompt lookup decoding): a row guesses the tokens that followed the earliest occurrence of its last
    `ngram` (down to 2) tokens, in its prompt or its own output. One pass scores the row's last token and its guesses;
    the row keeps the guesses that equal its own greedy choices, plus the choice after them. So the output is the
    one-token-at-a-time output (up to the float rounding of a different matmul shape), in fewer passes when the
    answer copies the prompt, as NER answers copy mentions from the sentence.

    With `stop` (a RepeatStop) a row also stops when it completes a line it has already written; its output ends
    before that line. The tokens before the stop are the ones the row would have generated without it."""
    device = model.model.embed_tokens.weight.device
    eos = torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id)), device=device)
    ids, mask = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    k = lookahead if temperature <= 0 else 0
    cache = KVCache(model.args, B, T + max_new_tokens + k, device, model.model.embed_tokens.weight.dtype)
    seq = torch.cat([ids, ids.new_full((B, max_new_tokens + k + 1), pad_id)], 1)  # per row: prompt, then output
    first = T - mask.sum(-1)  # (B,) column of each prompt's first real token
    n = torch.zeros(B, dtype=torch.long, device=device)  # tokens generated per row
    rows = torch.arange(B, device=device)  # the prompt each batch row belongs to
    result = [[] for _ in range(B)]
    h = model.hidden(ids, mask, cache=cache)[:, -1:]  # (B, 1, D): only the last position's logits are needed
    guesses = seq[:, :0]  # none for the first token
    while max_new_tokens > 0:
        b, m = h.shape[:2]  # rows still running, positions scored per row (1 + guesses)
        choice = sample_next(model.lm_logits(h).flatten(0, 1), temperature, top_p, generator).view(b, m)
        agree = (guesses == choice[:, :-1]).long().cumprod(-1)  # a guess counts only if all before it did
        n_new = 1 + agree.sum(-1)  # (b,) accepted guesses (each equals the choice there) plus the next choice
        j = torch.arange(m, device=device)
        is_eos = torch.isin(choice, eos) & (j < n_new[:, None])
        n_new = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, n_new)  # stop at the first eos
        n_new = torch.minimum(n_new, max_new_tokens - n)
        seq.scatter_(1, T + n[:, None] + j, choice)  # columns past n + n_new are overwritten later or never read
        n = n + n_new
        stopped = (is_eos & (j < n_new[:, None])).any(-1)
        done = stopped | (n >= max_new_tokens)
        cut_at = {}  # row -> its output's length, for the rows `stop` ends before a repeated line
        if stop is not None:
            new_line = (torch.isin(choice, stop.newline_ids.to(device)) & (j < n_new[:, None])).any(-1)
            for r in (new_line & ~done).nonzero().flatten().tolist():
                cut = stop.cut(seq[r, T:T + n[r]].tolist())
                if cut is not None:
                    cut_at[r], done[r] = cut, True
                    stop.stopped += 1
        if done.any():
            for r in done.nonzero().flatten().tolist():
                result[int(rows[r])] = seq[r, T:T + cut_at.get(r, int(n[r]) - int(stopped[r]))].tolist()
            if done.all():
                break
            keep = (~done).nonzero().flatten()
            cache.keep(keep)
            seq, first, n, rows = seq[keep], first[keep], n[keep], rows[keep]
        # feed each row's last token and its guesses; the cache rolls back to the tokens kept
        cache.pos = T + n - 1
        guesses, w = lookup_guesses(seq, T + n, first, k, ngram, pad_id) if k else (seq[:, :0], 0)
        last = seq.gather(1, (T + n - 1)[:, None])
        pos = (T - first + n - 1)[:, None] + torch.arange(w + 1, device=device)
        h = model.hidden(torch.cat([last, guesses], 1), position_ids=pos, cache=cache)
    return result

