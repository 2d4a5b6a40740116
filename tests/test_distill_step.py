"""distill.distill_step recomputed by hand: the paper's objective (Sec. 3.3) written out in float64 from the two tiny
models' full forward passes, with plain loops over samples and answer positions, and compared with what one real
optimiser step computes: each sample's w, each answer token's KD and CE, the objective over the global token count,
and the gradient of named parameters. Nothing from distill.py, weights.py or sft.answer_* is called by the oracle.

The samples are made to differ: L_stuSFT is set per sample and the teacher is sharpened so that its per-sample CE
(L_ckpt) spreads too, so a weight given to the wrong sample, applied to the wrong term, or teacher logits moved by one
token all change the numbers by far more than the tolerance."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from test_distill_losses import naive  # the float64 textbook divergences

import data
import distill
from losses import KDTerm
from model import load_model
from teachers import ModelTeacher

FACTORS = [0.25, 3.0, 0.6, 5.0]  # L_stuSFT / L_ckpt of the four samples, so w ≈ f / (1 + f): 0.2, 0.75, 0.375, 0.83
PARAMS = ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
          "model.embed_tokens.weight")


def plain_ce(model64, item) -> float:
    """Token-mean answer CE of one unpadded item, from float64 logits (the forward's own are cast to float32, which
    moves a 0.05 loss by 1e-3 of itself)."""
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        logits = full_logits64(model64, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0, :-1]
    y = torch.tensor(item["labels"][1:])
    return float(F.cross_entropy(logits[y != -100], y[y != -100]))


@pytest.fixture(scope="module")
def setup(module_tmp, tokenizer_dir):
    """Four items with 3, 16, 6 and 2 answer tokens; a teacher fitted to two of them (per-sample CE from about
    0.1 to about 14); L_stuSFT set per sample as a multiple of the teacher's CE."""
    root = module_tmp("step")
    tok = data.load_tokenizer(tokenizer_dir)
    pool, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=16), 80)
    items = [pool[i] for i in (0, 2, 6, 1)]
    teacher = load_model(make_tiny_model(root / "t", tokenizer_dir, n_layers=2, dim=32, seed=3))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(40):  # a few plain steps on items 0 and 3: the teacher knows those, not the others
        loss = 0
        for it in (items[0], items[3]):
            logits = teacher(torch.tensor([it["input_ids"]]))[0, :-1]
            loss = loss + F.cross_entropy(logits, torch.tensor(it["labels"][1:]), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.requires_grad_(False).eval()
    student = load_model(make_tiny_model(root / "s", tokenizer_dir, n_layers=1, dim=16, seed=4))
    with torch.no_grad():  # sharper than the N(0, 0.02) init's near-uniform output, so KD is no constant
        student.model.norm.weight.mul_(8.0)
    l_stu = {it["id"]: f * plain_ce(copy.deepcopy(teacher).double(), it) for it, f in zip(items, FACTORS)}
    return tok, items, teacher, student, l_stu


# -----------------------------------------------------------------------------
# the oracle


def full_logits64(model, batch) -> torch.Tensor:
    """(B, T, V) float64 logits of every position: the model's hidden states times its LM head, in float64."""
    return model.hidden(batch["input_ids"], batch["attention_mask"]) @ model.lm_head.weight.T


def hand_step(student64, teacher64, micro, l_stu: dict, args) -> dict:
    """The objective of one optimiser step, sample by sample and token by token."""
    n_total = 0
    for batch in micro:  # the global count: every answer token of every micro-batch
        for b in range(batch["labels"].shape[0]):
            n_total += sum(1 for y in batch["labels"][b, 1:].tolist() if y != -100)
    objective = torch.zeros((), dtype=torch.float64)
    per_token = {"w": [], "kd": [], "ce": []}
    per_sample_w = []
    for batch in micro:
        s_all = full_logits64(student64, batch)
        with torch.no_grad():
            u_all = full_logits64(teacher64, batch)
        for b, sample_id in enumerate(batch["ids"]):
            labels = batch["labels"][b].tolist()
            pos = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]  # position t predicts token t + 1
            y = torch.tensor([labels[t + 1] for t in pos])
            s, u = s_all[b, pos], u_all[b, pos]  # (n, V)
            ce_student = -torch.log_softmax(s, -1)[torch.arange(len(pos)), y]
            l_ckpt = float((-torch.log_softmax(u, -1)[torch.arange(len(pos)), y]).mean())
            w = l_stu[sample_id] / (l_stu[sample_id] + l_ckpt) if args.aw else args.alpha
            kd = naive(args.loss, s, u, args.temperature, args.beta)
            objective = objective + (w * kd + (1 - w) * ce_student).sum()
            per_sample_w.append(w)
            per_token["w"] += [w] * len(pos)
            per_token["kd"].append(kd.detach())
            per_token["ce"].append(ce_student.detach())
    objective = objective / n_total
    grads = torch.autograd.grad(objective, list(student64.parameters()))
    names = [n for n, _ in student64.named_parameters()]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    clip = min(1.0, 1.0 / (norm + 1e-6))  # what clip_grad_norm_(…, 1.0) does to the gradient it leaves
    return {"objective": float(objective.detach()), "n_total": n_total, "w": per_sample_w, "norm": norm,
            "token_w": torch.tensor(per_token["w"], dtype=torch.float64),
            "kd": torch.cat(per_token["kd"]), "ce": torch.cat(per_token["ce"]),
            "grads": {n: g * clip for n, g in zip(names, grads)}}


# -----------------------------------------------------------------------------
# the real step, with a spy on the per-token terms it combines


def real_step(student, teacher, micro, l_stu: dict, args, monkeypatch):
    """distill_step on a fresh copy of the student; returns its stats, the (kd, ce, w per token) it summed, and
    the gradients it left (after clipping)."""
    model = copy.deepcopy(student)
    seen = {"kd": [], "ce": [], "rows": [], "w": []}
    real_hidden, real_aw, term = distill.answer_hidden, distill.aw_weight, KDTerm.of(args)

    def kd_spy(*a):  # records what the real functions give, and gives it on
        kd, ce = term(*a)
        seen["kd"].append(kd.detach().double())
        seen["ce"].append(ce.detach().double())
        return kd, ce

    def hidden_spy(*a):
        h, labels, rows = real_hidden(*a)
        seen["rows"].append(rows)
        return h, labels, rows

    def aw_spy(*a):
        w = real_aw(*a)
        seen["w"].append(w.detach().double())
        return w

    monkeypatch.setattr(distill, "answer_hidden", hidden_spy)
    monkeypatch.setattr(distill, "aw_weight", aw_spy)
    lookup = (lambda ids: torch.tensor([l_stu[i] for i in ids])) if args.aw else None
    stats = distill.distill_step(model, ModelTeacher(teacher, torch.device("cpu"), args.dtype), lookup, kd_spy, micro,
                                 args.alpha, torch.device("cpu"), args.dtype)
    monkeypatch.setattr(distill, "answer_hidden", real_hidden)
    monkeypatch.setattr(distill, "aw_weight", real_aw)
    per_sample = seen["w"] if args.aw else [torch.full((int(r.max()) + 1,), args.alpha, dtype=torch.float64)
                                             for r in seen["rows"]]
    w = torch.cat([ws[r] for ws, r in zip(per_sample, seen["rows"])])
    return stats, torch.cat(seen["kd"]), torch.cat(seen["ce"]), w, {n: p.grad.double()
                                                                     for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = {
    "aw_fkl": dict(aw=True, loss="fkl", temperature=1.0),
    "alpha_fkl": dict(aw=False, alpha=0.3, loss="fkl", temperature=1.0),
    "aw_rkl_T2": dict(aw=True, loss="rkl", temperature=2.0),
    "aw_jsd": dict(aw=True, loss="jsd", beta=0.3, temperature=1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distill_step_matches_the_hand_computed_objective(case, setup, monkeypatch):
    tok, items, teacher, student, l_stu = setup
    args = SimpleNamespace(**{"alpha": 0.5, "beta": 0.5, "lam": 0.1, "dtype": "fp32", **CASES[case]})
    micro = [data.collate(items[:2], tok.pad_id), data.collate(items[2:], tok.pad_id)]  # two micro-batches

    ref = hand_step(copy.deepcopy(student).double(), copy.deepcopy(teacher).double(), micro, l_stu, args)
    stats, kd, ce, w, grads = real_step(student, teacher, micro, l_stu, args, monkeypatch)

    if args.aw:  # the samples really differ, so a weight on the wrong sample or term cannot go unseen
        torch.testing.assert_close(torch.tensor(ref["w"]), torch.tensor([f / (1 + f) for f in FACTORS]),
                                   rtol=1e-4, atol=1e-5)
    # per answer token: the weight of its own sample, the divergence and the gold CE
    torch.testing.assert_close(w, ref["token_w"], rtol=1e-3, atol=1e-4)  # fp32 CE of a 0.05-loss sample
    # fp32 log-softmax over 49,152 logits of the sharpened models leaves ~1e-4 relative error, which moves with the
    # CPU's vector width (1.3e-4 seen on one); a wrong sample, term or token moves them by far more than 1e-3
    torch.testing.assert_close(kd, ref["kd"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ce, ref["ce"], rtol=1e-3, atol=1e-5)
    # what the step reports: token means over the global count, and the mean w over samples
    assert stats["loss"] == pytest.approx(ref["objective"], rel=1e-4)
    assert stats["kd"] == pytest.approx(float(ref["kd"].sum()) / ref["n_total"], rel=1e-4)
    assert stats["ce"] == pytest.approx(float(ref["ce"].sum()) / ref["n_total"], rel=1e-4)
    assert stats["w"] == pytest.approx(sum(ref["w"]) / len(ref["w"]), rel=1e-4)
    # the gradient it leaves: of the objective over the global count, then clipped to norm 1
    assert stats["grad_norm"] == pytest.approx(ref["norm"], rel=1e-4)
    for name in PARAMS:  # relative to the whole tensor: fp32 noise on the embedding's near-zero entries is fine
        assert rel_err(grads[name], ref["grads"][name]) < 1e-3, name


def test_accumulation_does_not_change_the_step(setup, monkeypatch):
    """Two micro-batches give the gradient one batch of all four samples gives: the global normalisation."""
    tok, items, teacher, student, l_stu = setup
    args = SimpleNamespace(aw=True, alpha=0.5, beta=0.5, lam=0.1, dtype="fp32", loss="fkl", temperature=1.0)
    two = real_step(student, teacher, [data.collate(items[:2], tok.pad_id), data.collate(items[2:], tok.pad_id)],
                    l_stu, args, monkeypatch)
    one = real_step(student, teacher, [data.collate(items, tok.pad_id)], l_stu, args, monkeypatch)
    for k in ("loss", "kd", "ce", "w", "grad_norm"):
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-5), k
    for name in PARAMS:
        assert rel_err(two[4][name], one[4][name]) < 1e-4, name
