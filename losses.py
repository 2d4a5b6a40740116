"""The divergences of distillation and the gold cross-entropy, per answer token, sliced over tokens (arXiv
2601.10114, Sec. 3.3: the KD term of `w·KD + (1 − w)·CE`; Sec. 3.2: the KL of SCD's two metrics).

Every divergence takes answer-position logits (N, V) of the student and the teacher and returns one value per token
(N,), so the caller can weight each sample. They work in fp32 log-space: probabilities only multiply a difference of
log_softmax outputs, and a zero probability contributes 0, so there is no 0 * log 0, even for -inf logits.

`chunked` runs a function a slice of tokens at a time under activation checkpointing, so the (N, V) temporaries
exist for one slice only; `token_losses` applies the student's LM head inside the slice, so the student's (N, V)
logits never exist whole either.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24  # fp32 elements per (n, V) slice, 64 MiB: 341 tokens at vocab 49152, 130 at 128256

# -----------------------------------------------------------------------------
# divergences: logits (N, V) -> (N,), p = softmax(teacher / T), q = softmax(student / T)


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)  # skip a (N, V) pass at T=1


def kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """The terms p_v (log p_v − log q_v) of KL(p ‖ q), from log-probabilities (N, V) -> (N, V).

    Where p = 0 the term is 0, even when log p = -inf; q = 0 under p > 0 gives +inf, which is what the KL is."""
    p = logp.exp()
    # masking the difference rather than the product keeps 0 * inf out of the backward pass too
    return p * torch.where(p > 0, logp - logq, 0.0)


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row: (N, V) -> (N,)."""
    return kl_terms(logp, logq).sum(-1)


def mean_kl(logp: torch.Tensor, logq: torch.Tensor, rows: int = 256) -> float:
    """(1/N) Σ_j KL(p_j ‖ q_j) over N rows of log-probabilities, `rows` rows at a time (bounding the (n, V)
    temporaries); 0 for N = 0. SCD's two metrics."""
    total = sum(float(kl_terms(logp[i:i + rows].float(), logq[i:i + rows].float()).sum())
                for i in range(0, logp.shape[0], rows))
    return total / max(logp.shape[0], 1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, a: float) -> torch.Tensor:
    """log(a·p + (1 − a)·q) by logsumexp, exact at a = 0 and a = 1 (where a log-weight would be -inf)."""
    if a <= 0:
        return logq
    if a >= 1:
        return logp
    return torch.logaddexp(logp + math.log(a), logq + math.log1p(-a))


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p ‖ q) = Σ_v p_v (log p_v − log q_v): mode-covering, the classic KD loss (no T² factor)."""
    return kl_rows(log_probs(teacher, temperature), log_probs(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(q ‖ p) = Σ_v q_v (log q_v − log p_v): mode-seeking (MiniLLM)."""
    return kl_rows(log_probs(student, temperature), log_probs(teacher, temperature))


def jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), with m = β·p + (1 − β)·q:

        JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m),   log m = logsumexp(log β + log p, log(1 − β) + log q).

    JSD(β) itself vanishes at both ends; what it approaches there, after dividing by its weight, is used instead:
    β = 0 gives forward KL(p ‖ q) = lim JSD(β)/β, β = 1 gives reverse KL(q ‖ p) = lim JSD(β)/(1 − β).
    """
    logp, logq = log_probs(teacher, temperature), log_probs(student, temperature)
    if beta <= 0:
        return kl_rows(logp, logq)
    if beta >= 1:
        return kl_rows(logq, logp)
    logm = log_mix(logp, logq, beta)
    return beta * kl_rows(logp, logm) + (1 - beta) * kl_rows(logq, logm)


def skew_forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    lam: float = 0.1) -> torch.Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p ‖ λ·p + (1 − λ)·q); λ = 0 is forward KL."""
    logp, logq = log_probs(teacher, temperature), log_probs(student, temperature)
    return kl_rows(logp, log_mix(logp, logq, lam))


def skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    lam: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ λ·q + (1 − λ)·p); λ = 0 is reverse KL."""
    logp, logq = log_probs(teacher, temperature), log_probs(student, temperature)
    return kl_rows(logq, log_mix(logq, logp, lam))


def tvd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ½·Σ_v |p_v − q_v|, in [0, 1]."""
    return 0.5 * (log_probs(teacher, temperature).exp() - log_probs(student, temperature).exp()).abs().sum(-1)


def taid_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, t: float = 0.4) -> torch.Tensor:
    """TAID (Shing et al. 2025): forward KL(p_t ‖ q) to an intermediate target between the student and the teacher,

        p_t = softmax(((1 − t)·s̄ + t·z) / T),   s̄ the student's logits without gradient, z the teacher's,

    interpolated in logit space (teacher log-probs serve as logits: softmax ignores a per-row shift). t = 0 is the
    student itself (no signal), t = 1 forward KL from the teacher; TAIDTerm moves t from 0.4 to 1 during training."""
    mix = (1 - t) * student.detach().float() + t * teacher.float()
    return kl_rows(log_probs(mix, temperature), log_probs(student, temperature))


DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "skew_fkl": skew_forward_kl,
               "skew_rkl": skew_reverse_kl, "tvd": tvd, "taid": taid_kl}
PARAMS = {"jsd": ("beta",), "skew_fkl": ("lam",), "skew_rkl": ("lam",)}  # each divergence's own flags


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy −log softmax(logits)[label] per token (N,); label -100 gives 0."""
    return F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100)

# -----------------------------------------------------------------------------
# a top-k teacher: the divergences on k + 1 buckets


class TopK(NamedTuple):
    """A top-k teacher at N answer positions (temperature 1), as teacher_cache.py stores it."""
    values: torch.Tensor  # (N, k) the k largest log-probs
    indices: torch.Tensor  # (N, k) their token ids (int64)
    tail: torch.Tensor  # (N,) log of the remaining mass, -inf when k = V
    vocab_size: int


def tail_log_mass(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ indices} p_v per row (n,), from the other tokens' own log-probs (1 − Σ top-k would cancel)."""
    return torch.logsumexp(logp.scatter(-1, indices, float("-inf")), -1)


def bucket_log_probs(logq: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Collapse log-probs (n, V) into k + 1 buckets (n, k + 1): the tokens `indices` (n, k), then one bucket for all
    the others, log Σ_{v ∉ top-k} q_v (computed from their own log-probs, not as 1 − Σ top-k). With k = V there is
    nothing left and no tail bucket."""
    top = logq.gather(-1, indices)
    if indices.shape[-1] >= logq.shape[-1]:
        return top
    return torch.cat([top, tail_log_mass(logq, indices)[:, None]], -1)


def teacher_buckets(values: torch.Tensor, tail: torch.Tensor, vocab_size: int, temperature: float = 1.0):
    """The cached top-k teacher as k + 1 bucket log-probs at temperature T: softmax over

        log p_v / T  for the k kept tokens,   log(V − k) + (log m − log(V − k)) / T  for the tail of mass m.

    The tail's own log-probs were not kept, so it is tempered as if its mass were spread evenly over its V − k
    tokens: exact at T = 1 (the buckets are then p itself, renormalised after the on-disk rounding), exact for a
    one-token tail (k = V − 1) and with no tail (k = V); otherwise an approximation, which flattens (T > 1) or
    sharpens (T < 1) the tail less than the real tail would be."""
    logits = values.float() / temperature
    k = values.shape[-1]
    if k < vocab_size:
        log_n = math.log(vocab_size - k)
        logits = torch.cat([logits, (log_n + (tail.float() - log_n) / temperature)[:, None]], -1)
    return F.log_softmax(logits, -1)

# -----------------------------------------------------------------------------
# chunking over tokens


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def chunked(fn, *xs: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """Apply fn (row slices of xs -> tuple of (n,) tensors) `rows` rows at a time and concatenate the results.

    With autograd on, each slice runs under torch.utils.checkpoint: forward keeps only fn's inputs and outputs, and
    backward recomputes one slice's (n, V) temporaries at a time, at the price of running fn twice. Up to `rows`
    tokens (the usual training batch: answers are short) run as one piece with no recomputation; an empty batch too,
    so it stays in the graph and sums to 0, not NaN.
    """
    n = xs[0].shape[0]
    if n <= rows:
        return fn(*xs)
    grad = torch.is_grad_enabled()
    parts = []
    for i in range(0, n, rows):
        piece = [x[i:i + rows] for x in xs]
        parts.append(checkpoint(fn, *piece, use_reentrant=False) if grad else fn(*piece))
    return tuple(torch.cat(p) for p in zip(*parts))


def token_ce(x: torch.Tensor, labels: torch.Tensor, head=None, vocab_size: int | None = None) -> torch.Tensor:
    """per_token_ce (N,) a slice of tokens at a time: of (N, V) logits x, or of head(x) for hidden states x (N, D),
    so that (N, V) logits are never built whole."""
    head = head or (lambda t: t)
    ce, = chunked(lambda t, y: (per_token_ce(head(t), y),), x, labels, rows=chunk_rows(vocab_size or x.shape[-1]))
    return ce


def token_losses(h: torch.Tensor, head, teacher, labels: torch.Tensor, loss: str = "fkl",
                 temperature: float = 1.0, rows: int | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer token: the divergence of the student from the teacher, and the student's gold CE; (N,) each.

    Args:
        h: (N, D) the student's hidden states at answer positions; head(h) gives its fp32 logits (pass
            head=lambda x: x to give logits directly). head runs inside each slice, so the student's (N, V) logits
            are never built whole.
        teacher: no gradient; (N, V) logits or log-probs (log_softmax(log p / T) = log_softmax(logits / T)), or a
            TopK: then both distributions are collapsed into the same k + 1 buckets (bucket_log_probs on the
            student's tempered log-probs, teacher_buckets on the teacher's) and the divergence is taken between the
            buckets at T = 1. Every divergence here is an f-divergence, so by the data-processing inequality the
            bucketed value is a lower bound of the full one; it is exact when the tail is one token or empty.
        labels: (N,) gold tokens; the CE is at temperature 1, the divergence at `temperature`.
        params: the divergence's own (beta for jsd, lam for the skew KLs).
    Returns:
        (divergence (N,), CE (N,)).
    """
    divergence = DIVERGENCES[loss]
    if isinstance(teacher, TopK):
        def slice_buckets(h, values, indices, tail, y):
            s = head(h)  # (n, V) fp32
            logq = bucket_log_probs(log_probs(s, temperature), indices)  # (n, k + 1)
            logp = teacher_buckets(values, tail, s.shape[-1], temperature)
            return divergence(logq, logp, 1.0, **params), per_token_ce(s, y)

        return chunked(slice_buckets, h, teacher.values, teacher.indices, teacher.tail, labels,
                       rows=rows or chunk_rows(teacher.vocab_size))

    def slice_losses(h, t, y):
        s = head(h)  # (n, V) fp32
        return divergence(s, t, temperature, **params), per_token_ce(s, y)

    return chunked(slice_losses, h, teacher.detach(), labels, rows=rows or chunk_rows(teacher.shape[-1]))

# -----------------------------------------------------------------------------
# the KD term of distill_step


class KDTerm:
    """The KD term of the objective: a divergence at a temperature with its parameters, applied per answer token by
    token_losses. update() runs after every optimiser step with the step's token-mean KD; state() and load() carry
    whatever it keeps across a resume."""

    def __init__(self, loss: str, temperature: float = 1.0, **params):
        self.loss, self.temperature, self.fixed = loss, temperature, params

    @classmethod
    def of(cls, args) -> "KDTerm":
        """The term distill.py's flags name: --loss at --temperature, with its own flags (--beta, --lam)."""
        return cls(args.loss, args.temperature, **{k: getattr(args, k) for k in PARAMS.get(args.loss, ())})

    def __call__(self, h: torch.Tensor, head, teacher, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(divergence (N,), gold CE (N,)) per answer token: token_losses with this term's divergence."""
        return token_losses(h, head, teacher, labels, self.loss, self.temperature, **self.params())

    def params(self) -> dict:
        """The divergence's parameters at this step."""
        return self.fixed

    def update(self, kd: float, step: int):
        """After each step, with its mean divergence: a fixed divergence has nothing to adapt (TAID's t does)."""

    def logged(self) -> dict:
        """What metrics.jsonl shows of the term at this step, beside the losses."""
        return {}

    def state(self) -> dict:
        return {}

    def load(self, state: dict):
        """Restore state() on resume: a fixed divergence has none."""


class TAIDTerm(KDTerm):
    """TAID's adaptive interpolation (Shing et al. 2025, ICLR; official code SakanaAI/TAID): t starts at t_start and
    never falls below the linear ramp t_start -> t_end over the run's steps; while the KD loss keeps falling it moves
    faster, by

        m ← β·m + (1 − β)·(L_prev − L) / L_prev,    t ← min(t_end, max(ramp, t + α·σ(m)·(1 − t))).

    The first step only records its loss. Defaults are the paper's: t_start 0.4, t_end 1, α 5e-4, β 0.99."""

    def __init__(self, total_steps: int, temperature: float = 1.0, t_start: float = 0.4, t_end: float = 1.0,
                 alpha: float = 5e-4, beta: float = 0.99):
        super().__init__("taid", temperature)
        self.total, self.t_start, self.t_end, self.alpha, self.beta = total_steps, t_start, t_end, alpha, beta
        self.t, self.prev, self.momentum = t_start, None, 0.0

    def params(self) -> dict:
        return {"t": self.t}

    def logged(self) -> dict:
        return {"taid_t": self.t}

    def update(self, kd: float, step: int):
        """After optimiser step `step` (counted from 0) whose token-mean KD was `kd`."""
        if self.prev is None:
            self.prev = kd
            return
        self.momentum = self.beta * self.momentum + (1 - self.beta) * (self.prev - kd) / (self.prev + 1e-15)
        ramp = self.t_start + (self.t_end - self.t_start) * step / self.total
        grow = self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
        self.t, self.prev = min(self.t_end, max(ramp, self.t + grow)), kd

    def state(self) -> dict:
        return {"t": self.t, "prev": self.prev, "momentum": self.momentum}

    def load(self, state: dict):
        self.t, self.prev, self.momentum = state["t"], state["prev"], state["momentum"]
