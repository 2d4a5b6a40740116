"""weights.py: the AW formula, per-sample token means, the SFS/TFS split, the loss table."""

import math

import pytest
import torch

import data
import weights
from model import load_model
from runtime import UserError
from weights import aw_weight, sample_mean, sfs_tfs


def test_aw_on_hand_values():
    w = aw_weight(torch.tensor([1.0, 3.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 2.0, 1.5]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75, 0.5, 0.25]))
    # the sigmoid-of-log-ratio form equals the plain ratio on any positive losses
    ls, lc = torch.rand(100) * 5 + 1e-3, torch.rand(100) * 5 + 1e-3
    torch.testing.assert_close(aw_weight(ls, lc), ls / (ls + lc))


def test_aw_direction():
    """A sample the frozen SFT student finds harder gets more KD weight; one the teacher finds harder, less."""
    grid = torch.linspace(0.1, 10, 50)
    w_by_student = aw_weight(grid, torch.ones(50))
    w_by_teacher = aw_weight(torch.ones(50), grid)
    assert (w_by_student.diff() > 0).all() and (w_by_teacher.diff() < 0).all()
    assert w_by_student[0] < 0.5 < w_by_student[-1]


def test_aw_safe_at_zero_and_huge_losses():
    inf = float("inf")
    ls = torch.tensor([0.0, 0.0, 1.0, inf, inf, 1e38, 1e-30])
    lc = torch.tensor([0.0, 1.0, 0.0, 1.0, inf, 1e38, 1e-30])
    w = aw_weight(ls, lc)
    assert torch.isfinite(w).all() and ((w >= 0) & (w <= 1)).all()
    assert w[0] == 0.5 and w[4] == 0.5 and w[5] == 0.5 and w[6] == 0.5
    assert w[1] < 1e-6 and w[2] > 1 - 1e-6 and w[3] > 1 - 1e-6


def test_sample_mean():
    values = torch.tensor([1.0, 3.0, 10.0, 2.0, 4.0, 6.0])
    idx = torch.tensor([0, 0, 1, 3, 3, 3])
    out = sample_mean(values, idx, 5)
    ref = torch.tensor([sum(v for v, i in zip(values.tolist(), idx.tolist()) if i == b) /
                        max(1, (idx == b).sum().item()) for b in range(5)])
    torch.testing.assert_close(out, ref)
    assert out[2] == 0 and out[4] == 0  # samples without tokens
    assert sample_mean(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_sfs_tfs_on_hand_values():
    ids = ["a", "b", "c", "d", "e"]
    stu = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    tea = torch.tensor([2.0, 2.0, 1.0, 5.0, 4.0])  # student better on a and d; tie on b goes to TFS
    r = sfs_tfs(ids, stu, tea)
    assert r["sfs_ids"] == ["a", "d"] and r["tfs_ids"] == ["b", "c", "e"]
    assert r["sfs_share"] == pytest.approx(0.4) and r["tfs_share"] == pytest.approx(0.6)
    assert r["sfs_gap"] == pytest.approx(1.0)  # (1 + 1) / 2
    assert r["tfs_gap"] == pytest.approx((0 + 2 + 1) / 3)
    assert r["n"] == 5 and r["mean_loss_student"] == pytest.approx(3.0)
    empty = sfs_tfs([], torch.zeros(0), torch.zeros(0))
    assert empty["sfs_share"] == 0 and empty["tfs_gap"] == 0
    assert "SFS share" in weights.format_sfs_tfs({"best": r})


def test_sample_losses_match_a_per_example_forward(tiny_model_dir):
    tok = data.load_tokenizer(tiny_model_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=5), 160)
    model = load_model(tiny_model_dir)
    ours = weights.sample_losses(model, items, tok.pad_id, batch_size=2, device=torch.device("cpu"))
    ref = []
    with torch.no_grad():
        for it in items:  # one unpadded sequence at a time, full (T, V) logits
            logits = model(torch.tensor([it["input_ids"]]))[0, :-1]
            labels = torch.tensor(it["labels"][1:])
            keep = labels != -100
            ref.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    torch.testing.assert_close(ours, torch.stack(ref), atol=1e-5, rtol=1e-5)


def hand_losses(model, items) -> list[float]:
    """Token-mean answer CE per item in float64: full forward of the unpadded item, labels shifted by hand."""
    out = []
    with torch.no_grad():
        for it in items:
            logp = torch.log_softmax(model(torch.tensor([it["input_ids"]]))[0].double(), -1)  # (T, V)
            terms = [-logp[t, y] for t, y in enumerate(it["labels"][1:]) if y != -100]  # position t predicts t + 1
            out.append(float(sum(terms) / len(terms)))
    return out


def test_sample_losses_and_sfs_tfs_from_hand_built_models(tmp_path, tokenizer_dir):
    """Two models whose losses are known: one with a zero final norm predicts the uniform distribution, so its
    loss is exactly log V on every sample; the other is fitted to two of the samples, so it beats uniform there
    and loses elsewhere. sample_losses (padded, length-sorted batches) must give the hand values in the items'
    order, and the SFS/TFS split and gaps must follow from them."""
    from conftest import make_tiny_model
    import torch.nn.functional as F

    tok = data.load_tokenizer(tokenizer_dir)
    pool, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=16), 80)
    items = pool[:6]
    uniform = load_model(make_tiny_model(tmp_path / "u", tokenizer_dir, seed=5))
    with torch.no_grad():
        uniform.model.norm.weight.zero_()  # logits exactly 0
    fitted = load_model(make_tiny_model(tmp_path / "f", tokenizer_dir, seed=6))
    opt = torch.optim.Adam(fitted.parameters(), lr=1e-2)
    for _ in range(30):
        loss = sum(F.cross_entropy(fitted(torch.tensor([it["input_ids"]]))[0, :-1], torch.tensor(it["labels"][1:]),
                                   ignore_index=-100) for it in (items[0], items[3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    cpu = torch.device("cpu")
    log_v = math.log(uniform.args.vocab_size)
    l_uniform = weights.sample_losses(uniform, items, tok.pad_id, 4, cpu)
    torch.testing.assert_close(l_uniform, torch.full((6,), log_v), rtol=1e-6, atol=1e-5)
    l_fitted = weights.sample_losses(fitted, items, tok.pad_id, 4, cpu)
    ref = hand_losses(fitted, items)
    torch.testing.assert_close(l_fitted.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-4)

    ids = [it["id"] for it in items]
    split = sfs_tfs(ids, l_fitted, l_uniform)  # the fitted model as the student, uniform as the teacher
    sfs = [i for i, r in zip(ids, ref) if r < log_v]
    tfs = [i for i, r in zip(ids, ref) if r >= log_v]
    assert ids[0] in sfs and ids[3] in sfs and tfs  # both sides are populated, so the split is tested
    assert split["sfs_ids"] == sfs and split["tfs_ids"] == tfs
    assert split["sfs_gap"] == pytest.approx(sum(log_v - r for r in ref if r < log_v) / len(sfs), rel=1e-5)
    assert split["tfs_gap"] == pytest.approx(sum(r - log_v for r in ref if r >= log_v) / len(tfs), rel=1e-5)
    # and AW's weight on them: L_stuSFT / (L_stuSFT + L_ckpt)
    torch.testing.assert_close(aw_weight(l_fitted, l_uniform).double(),
                               torch.tensor([r / (r + log_v) for r in ref], dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_loss_table_round_trip(tmp_path):
    ids = ["x/1", "x/2", "x/3"]
    cols = {"student_sft": torch.tensor([1.0, 2.0, 3.0]), "step_000010": torch.tensor([0.5, 2.5, 3.0])}
    weights.save_losses(tmp_path / "t.safetensors", ids, cols, {"task": "t", "steps": [10]})
    ids2, cols2, meta = weights.load_losses(tmp_path / "t.safetensors")
    assert ids2 == ids and meta == {"task": "t", "steps": [10]}
    assert all(torch.equal(cols[k], cols2[k]) for k in cols)
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a table")
    with pytest.raises(UserError, match="bad.safetensors"):
        weights.load_losses(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="not found"):
        weights.load_losses(tmp_path / "missing.safetensors")
