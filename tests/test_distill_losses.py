"""The divergences of distill.py: identities, naive full-vocab references, chunking, empty batches, extreme logits,
accumulation invariance."""

import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import DIVERGENCES, chunked, forward_kl, jsd, per_token_ce, reverse_kl, token_losses

N, V = 10, 23


def logits_pair(scale=3.0, n=N, v=V):
    return torch.randn(n, v) * scale, torch.randn(n, v) * scale


def naive(name, s, t, T=1.0, beta=0.5, lam=0.1, t_mix=0.4):
    """Each divergence the long way, in float64 probabilities: softmax, then log of the probabilities."""
    q, p = torch.softmax(s.double() / T, -1), torch.softmax(t.double() / T, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_fkl":
        return kl(p, lam * p + (1 - lam) * q)
    if name == "skew_rkl":
        return kl(q, lam * q + (1 - lam) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "taid":  # TAID's target: the logits interpolated, then softmax
        return kl(torch.softmax(((1 - t_mix) * s.double() + t_mix * t.double()) / T, -1), q)
    raise KeyError(name)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_zero_for_equal_inputs_positive_otherwise(name, T):
    s, t = logits_pair()
    same = DIVERGENCES[name](s, s.clone(), T)
    assert same.shape == (N,) and same.abs().max() < 1e-6
    # a constant shift of the logits is the same distribution
    assert DIVERGENCES[name](s, s + 5.0, T).abs().max() < 1e-5
    assert (DIVERGENCES[name](s, t, T) > 1e-3).all()


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_matches_naive_full_vocab_reference(name, T):
    s, t = logits_pair()
    ours = DIVERGENCES[name](s, t, T)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), naive(name, s, t, T), atol=1e-5, rtol=1e-4)


def test_forward_kl_is_torch_kl_div():
    s, t = logits_pair()
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(forward_kl(s, t), ref)
    ref_rev = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(reverse_kl(s, t), ref_rev)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_jsd_and_skew_parameters_match_reference(beta, lam):
    s, t = logits_pair()
    torch.testing.assert_close(jsd(s, t, beta=beta).double(), naive("jsd", s, t, beta=beta), atol=1e-5, rtol=1e-4)
    for name in ("skew_fkl", "skew_rkl"):
        torch.testing.assert_close(DIVERGENCES[name](s, t, lam=lam).double(), naive(name, s, t, lam=lam),
                                   atol=1e-5, rtol=1e-4)


def test_jsd_endpoints():
    s, t = logits_pair()
    torch.testing.assert_close(jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(jsd(s, t, beta=1.0), reverse_kl(s, t))
    # the endpoints are the limits of JSD(β)/β and JSD(β)/(1 − β): the mixture formula approaches them
    # (with moderate logits, where the O(β²) remainder is small)
    s, t, eps = s / 3, t / 3, 1e-3
    torch.testing.assert_close(jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=2e-2, atol=1e-3)
    # β = ½ is the ordinary Jensen-Shannon divergence, bounded by log 2
    assert (jsd(s * 10, t * 10, beta=0.5) <= math.log(2) + 1e-6).all()


def test_skew_endpoints():
    s, t = logits_pair()
    torch.testing.assert_close(DIVERGENCES["skew_fkl"](s, t, lam=0.0), forward_kl(s, t))
    torch.testing.assert_close(DIVERGENCES["skew_rkl"](s, t, lam=0.0), reverse_kl(s, t))
    assert DIVERGENCES["skew_fkl"](s, t, lam=1.0).abs().max() < 1e-6


def test_per_token_ce():
    s, _ = logits_pair()
    y = torch.randint(0, V, (N,))
    ref = -torch.log_softmax(s.double(), -1)[torch.arange(N), y]
    torch.testing.assert_close(per_token_ce(s, y).double(), ref, atol=1e-5, rtol=1e-5)
    y[3] = -100
    assert per_token_ce(s, y)[3] == 0


def head_and_inputs(n=N, d=8, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
    h = torch.randn(n, d, generator=g).requires_grad_()
    return head, h, torch.randn(n, v, generator=g) * 3, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_chunked_equals_unchunked_values_and_gradients(name):
    results = []
    for rows in (3, N):  # 3 does not divide 10: a short last slice too
        head, h, t, y = head_and_inputs()
        kd, ce = token_losses(h, head, t, y, name, temperature=2.0, rows=rows)
        (kd * torch.linspace(0.1, 1, N) + 0.3 * ce).sum().backward()
        results.append((kd.detach(), ce.detach(), h.grad, head.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # and the unchunked values are the plain functions on the full logits
    head, h, t, y = head_and_inputs()
    torch.testing.assert_close(results[1][0], DIVERGENCES[name](head(h), t, 2.0).detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], per_token_ce(head(h), y).detach(), atol=1e-6, rtol=1e-5)


def test_chunking_recomputes_slices_instead_of_keeping_them():
    head, h, t, y = head_and_inputs()
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return head(x)

    kd, ce = token_losses(h, counted, t, y, "fkl", rows=4)
    assert calls == [4, 4, 2]
    (kd + ce).sum().backward()
    assert sorted(calls) == [2, 2, 4, 4, 4, 4]  # backward re-ran every slice: nothing of them was kept

    # what autograd keeps for backward, beyond the inputs: with slices nothing; without, several (N, V) tensors
    def saved_bytes(rows):
        head, h, t, y = head_and_inputs(n=64, v=512)
        inputs = {x.untyped_storage().data_ptr() for x in (h, t, y, head.weight)}
        kept = {}

        def pack(x):
            if x.untyped_storage().data_ptr() not in inputs:
                kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            token_losses(h, head, t, y, "jsd", rows=rows)
        return sum(kept.values())

    full = 64 * 512 * 4
    assert saved_bytes(64) > 3 * full
    assert saved_bytes(8) < 64 * 8 * 4


def test_chunked_without_grad_runs_each_slice_once():
    _, h, _, _ = head_and_inputs()
    calls = []
    with torch.no_grad():
        chunked(lambda x: (calls.append(len(x)) or x.sum(-1),), h, rows=4)
    assert calls == [4, 4, 2]


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_empty_batch_gives_zero_not_nan(name):
    head, h, t, y = head_and_inputs(n=0)
    kd, ce = token_losses(h, head, t, y, name, rows=4)
    assert kd.shape == ce.shape == (0,)
    w = torch.zeros(0)
    loss = (w * kd + (1 - w) * ce).sum() / max(0, 1)  # distill_step's objective on no tokens
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_extreme_logits_give_finite_values_and_gradients(name, T):
    g = torch.Generator().manual_seed(1)
    s = ((torch.randint(0, 2, (N, V), generator=g) * 2 - 1) * 1e4).requires_grad_()
    t = (torch.randint(0, 2, (N, V), generator=g) * 2 - 1) * 1e4
    t[0] = s[0].detach()  # one row with equal extremes too
    kd, ce = token_losses(s, lambda x: x, t, torch.randint(0, V, (N,), generator=g), name, temperature=T, rows=4)
    (kd.sum() + ce.sum()).backward()
    assert torch.isfinite(kd).all() and torch.isfinite(ce).all() and torch.isfinite(s.grad).all()
    assert kd[0].abs() < 1e-4


def test_teacher_zero_probabilities_are_not_nan():
    # a teacher that puts exactly zero mass on some tokens (-inf logits): 0 · log 0 must count as 0
    s = torch.randn(N, V).requires_grad_()
    t = torch.randn(N, V)
    t[:, :5] = -math.inf
    for name in ("fkl", "jsd", "skew_fkl", "skew_rkl", "tvd"):
        s.grad = None
        v = DIVERGENCES[name](s, t)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(s.grad).all(), name
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.detach().double(), -1)
    ref = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)
    torch.testing.assert_close(forward_kl(s, t).double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.isinf(reverse_kl(s, t)).all()  # the student has mass where the teacher has none: KL is infinite


def test_accumulation_invariance():
    """Two half-batches, each divided by the global token count, give the full batch's loss and gradient."""
    head, h, t, y = head_and_inputs(n=12)
    sample_idx = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    w = torch.tensor([0.2, 0.9, 0.5, 0.7])[sample_idx]
    n_global = len(y)

    def grads(parts):
        head.weight.grad, h.grad, total = None, None, 0.0
        for sl in parts:
            kd, ce = token_losses(h[sl], head, t[sl], y[sl], "jsd", rows=2)
            loss = (w[sl] * kd + (1 - w[sl]) * ce).sum() / n_global  # distill_step's objective
            loss.backward()
            total += loss.item()
        return total, head.weight.grad.clone(), h.grad.clone()

    full = grads([slice(0, 12)])
    halves = grads([slice(0, 5), slice(5, 12)])  # samples 0-1 and samples 2-3
    for a, b in zip(full, halves):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=1e-6, rtol=1e-5)


def test_chunk_rows_bounds_slice_size():
    assert losses.chunk_rows(49152) * 49152 <= losses.CHUNK_ELEMENTS
    assert losses.chunk_rows(128256) >= 1 and losses.chunk_rows(10 ** 9) == 1


def test_taid_target_is_the_student_at_0_and_the_teacher_at_1():
    s, t = logits_pair()
    torch.testing.assert_close(losses.taid_kl(s, t, t=1.0), forward_kl(s, t))
    assert losses.taid_kl(s, t, t=0.0).abs().max() < 1e-6  # the target is the student itself
    torch.testing.assert_close(losses.taid_kl(s, t, t=0.7).double(), naive("taid", s, t, t_mix=0.7), atol=1e-5,
                               rtol=1e-4)
    # teacher log-probs give the same target as its logits (softmax ignores the per-row shift)
    torch.testing.assert_close(losses.taid_kl(s, torch.log_softmax(t, -1), t=0.7), losses.taid_kl(s, t, t=0.7))
    # no gradient flows through the target's student half
    s = s.clone().requires_grad_()
    losses.taid_kl(s, t, t=0.5).sum().backward()
    target = torch.softmax(0.5 * s.detach() + 0.5 * t, -1)
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - target, atol=1e-6, rtol=1e-5)


def test_taid_t_schedule_by_hand():
    """t over a few steps from known losses: the first only records its loss, then momentum and growth as written in
    TAIDTerm's docstring, never below the linear ramp, never above t_end."""
    term = losses.TAIDTerm(total_steps=10, alpha=0.5, beta=0.9)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    term.update(2.0, 0)
    assert (term.t, term.prev, term.momentum) == (0.4, 2.0, 0.0)
    term.update(1.0, 1)  # loss halved: relative change 0.5
    m = 0.1 * 0.5
    t1 = max(0.4 + 0.6 * 1 / 10, 0.4 + 0.5 * sigmoid(m) * 0.6)
    assert term.momentum == pytest.approx(m) and term.t == pytest.approx(t1)
    term.update(1.5, 2)  # loss rose by half: the momentum falls, growth slows
    m = 0.9 * m + 0.1 * (1.0 - 1.5) / 1.0
    t2 = max(0.4 + 0.6 * 2 / 10, t1 + 0.5 * sigmoid(m) * (1 - t1))
    assert term.momentum == pytest.approx(m) and term.t == pytest.approx(t2)
    slow = losses.TAIDTerm(total_steps=10, alpha=0.0)  # no adaptive growth: exactly the ramp
    for step, loss in enumerate([3.0, 2.0, 1.0, 0.5]):
        slow.update(loss, step)
    assert slow.t == pytest.approx(0.4 + 0.6 * 3 / 10)
    for step in range(4, 40):
        term.update(0.1, step)
    assert term.t == 1.0  # t_end caps it
    restored = losses.TAIDTerm(total_steps=10)
    restored.load(term.state())
    assert restored.params() == {"t": 1.0} and restored.state() == term.state()
