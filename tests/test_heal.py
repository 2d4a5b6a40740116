"""heal.py: the corpus holds no validation or test text, the layer-choice rules on hand-built hidden states, the hidden
states against transformers, the healing loss against a float64 recomputation, and a real run that heals and resumes."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import data
import heal
import prepare
from conftest import make_tiny_model
from model import load_model, save_model

# -----------------------------------------------------------------------------
# the corpus


def iob_sentences(path):
    """Sentences of an IOB file, parsed here without data.py: tokens joined by one space."""
    out, words = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            words.append(line.split("\t")[0])
        elif words:
            out.append(" ".join(words))
            words = []
    return out + ([" ".join(words)] if words else [])


def test_corpus_has_no_validation_or_test_text():
    texts = heal.corpus_texts()
    root = data.DATA_DIR
    held_out = {s for task in ("ncbi_disease", "bc5cdr") for f in ("devel.tsv", "test.tsv")
                for s in iob_sentences(root / task / f)}
    train = [s for task in ("ncbi_disease", "bc5cdr") for s in iob_sentences(root / task / "train.tsv")]
    assert not held_out & set(texts)
    # every training sentence is in, except those that also occur in a held-out split
    assert sum(s not in held_out for s in train) == sum(t in set(train) for t in texts) > 9000
    # PubMedQA: no context paragraph of a test or validation question appears in any text
    pqal = json.loads((root / "pubmedqa" / "ori_pqal.json").read_text())
    test_ids = set(json.loads((root / "pubmedqa" / "test_ground_truth.json").read_text()))
    val_ids = {ex.id.split("/")[1] for ex in data.load_examples("pubmedqa", "val")}
    assert len(test_ids) == 500 and len(val_ids) == 100
    blob = "\n".join(texts)
    for pmid in test_ids | val_ids:
        for c in pqal[pmid]["CONTEXTS"]:
            assert len(c) < 50 or c not in blob, pmid  # short ones ("None.") occur in other abstracts too
    train_ids = set(pqal) - test_ids - val_ids
    assert sum(any(c in blob for c in pqal[p]["CONTEXTS"]) for p in train_ids) == len(train_ids) == 400


def test_pack_joins_texts_with_eos(tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    texts = ["Aspirin reduces fever .", "BRCA1 mutations", "cause breast cancer ."]
    ids = sum((tok.encode(t) + [tok.eos_id] for t in texts), [])
    rows = heal.pack(texts, tok, 4)
    assert rows.shape == (len(ids) // 4, 4) and rows.flatten().tolist() == ids[:rows.numel()]

# -----------------------------------------------------------------------------
# which layers go


def states_with_idle_layers(idle: set[int], n_layers=8, n=50, d=16):
    """x_0..x_L where layer i changes its input a lot, except the `idle` layers, which add a tiny nudge."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(n, d, generator=g)]
    for i in range(n_layers):
        step = torch.randn(n, d, generator=g) * (0.01 if i in idle else 3.0)
        x.append(x[-1] + step)
    return x


def test_angular_drops_the_idle_block():
    states = states_with_idle_layers({3, 4, 5})
    kept, scores = heal.choose_layers("angular", 8, 5, states)
    assert kept == [0, 1, 2, 6, 7] and scores["dropped_block_start"] == 3
    d = scores["angular_distance"]
    # d(l) by hand for the chosen block: arccos of the cosine between x_3 and x_6, averaged, over pi
    cos = (states[3] * states[6]).sum(-1) / (states[3].norm(dim=-1) * states[6].norm(dim=-1))
    assert d[3] == pytest.approx(float(torch.arccos(cos).mean()) / math.pi, abs=1e-6)
    assert d[3] < 0.01 < min(d[:3] + d[4:])


def test_block_influence_drops_the_idle_layers_wherever_they_are():
    states = states_with_idle_layers({1, 4, 6})
    kept, scores = heal.choose_layers("block_influence", 8, 5, states)
    assert kept == [0, 2, 3, 5, 7]
    bi = scores["block_influence"]
    cos = (states[4] * states[5]).sum(-1) / (states[4].norm(dim=-1) * states[5].norm(dim=-1))
    assert bi[4] == pytest.approx(1 - float(cos.mean()), abs=1e-6)


def test_every_other_is_prepares_spacing():
    assert heal.choose_layers("every_other", 30, 15)[0] == prepare.keep_layers(30, 15)


def test_layer_states_match_transformers_hidden_states(tmp_path):
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 12))
    states = heal.layer_states(ours, ids)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states  # embeddings, each layer, the last one normed
    assert len(states) == len(ref) == 4
    for l in range(3):
        assert (states[l] - ref[l].flatten(0, 1)).abs().max() < 1e-5, l
    assert (ours.model.norm(states[3]) - ref[3].flatten(0, 1)).abs().max() < 1e-5

# -----------------------------------------------------------------------------
# the healing loss


def test_heal_loss_is_full_vocab_forward_kl_at_every_position(tmp_path, tokenizer_dir):
    teacher = load_model(make_tiny_model(tmp_path / "t", tokenizer_dir, n_layers=3, seed=1)).eval()
    student = prepare.prune_layers(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the teacher's own layers: the KL is not small
    rows = torch.randint(0, teacher.args.vocab_size, (2, 7))
    kd, ce, n = heal.heal_loss_sum(student, teacher, rows, torch.device("cpu"), "fp32")
    with torch.no_grad():
        logp = torch.log_softmax(teacher(rows).double(), -1)  # (2, 7, V)
        logq = torch.log_softmax(student(rows).double(), -1)
    want_kd = float((logp.exp() * (logp - logq)).sum())  # all 14 positions, the last one too
    want_ce = float(-logq[:, :-1].gather(-1, rows[:, 1:, None]).sum())  # next-token CE: the last has no target
    assert n == 14 and want_kd > 0.1
    assert float(kd.detach()) == pytest.approx(want_kd, rel=1e-5)
    assert float(ce.detach()) == pytest.approx(want_ce, rel=1e-5)

# -----------------------------------------------------------------------------
# a real run


def run_heal(tmp_path, teacher_dir, out, export, *extra):
    heal.main(["--teacher", str(teacher_dir), "--prune", "angular", "--layers", "2", "--tokens", str(8 * 2 * 32),
               "--seq-len", "32", "--batch-size", "2", "--calib-rows", "4", "--eval-tokens", "256", "--evals", "2",
               "--lr", "3e-3", "--dtype", "fp32", "--device", "cpu", "--out", str(out), "--export", str(export),
               *extra])


def peaked_teacher(tmp_path, tokenizer_dir):
    """A tiny teacher with N(0, 0.3) weights: N(0, 0.02) gives near-uniform outputs, and a KL of 0.001 to learn."""
    path = make_tiny_model(tmp_path / "teacher", tokenizer_dir, n_layers=4, seed=3)
    model = load_model(path)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(15)
    save_model(model, path)
    return path


def test_heal_run_learns_exports_and_resumes_exactly(tmp_path, tokenizer_dir, monkeypatch):
    teacher_dir = peaked_teacher(tmp_path, tokenizer_dir)
    run_heal(tmp_path, teacher_dir, tmp_path / "run", tmp_path / "student")
    info = json.loads((tmp_path / "student" / "heal.json").read_text())
    student = load_model(tmp_path / "student")
    assert student.args.n_layers == 2 == len(info["kept_layers"]) and info["tokens_trained"] == 512
    assert [c["step"] for c in info["curve"]] == [0, 4, 8]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if "kl" in r]
    assert kl[-1] < kl[0]  # the student moves towards its teacher
    assert "healed" in (tmp_path / "student" / "README.md").read_text()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["prune"] == "angular"

    # a run that crashes after its first checkpoint resumes to the same weights
    real_update = heal.apply_update

    def crash_at_step_6(optimizer, lr, step, loss, grad_norm):
        if step == 5:
            raise RuntimeError("killed")
        real_update(optimizer, lr, step, loss, grad_norm)

    monkeypatch.setattr(heal, "apply_update", crash_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        run_heal(tmp_path, teacher_dir, tmp_path / "cut", tmp_path / "student2")
    assert not (tmp_path / "student2").exists()
    monkeypatch.setattr(heal, "apply_update", real_update)
    run_heal(tmp_path, teacher_dir, tmp_path / "cut", tmp_path / "student2", "--resume")
    a, b = load_model(tmp_path / "student").state_dict(), load_model(tmp_path / "student2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    curve = json.loads((tmp_path / "student2" / "heal.json").read_text())["curve"]
    assert [(c["step"], c["perplexity"]) for c in curve] == [(c["step"], c["perplexity"]) for c in info["curve"]]


def test_heal_errors_are_one_line(tmp_path, tokenizer_dir, capsys):
    from runtime import UserError
    teacher_dir = make_tiny_model(tmp_path / "teacher", tokenizer_dir, n_layers=4, seed=3)
    with pytest.raises(UserError, match="--layers 5"):
        run_heal(tmp_path, teacher_dir, tmp_path / "run", "", "--layers", "5")
    assert not (tmp_path / "run").exists()  # refused before --out was touched
    with pytest.raises(UserError, match="--seq-len"):
        heal.main(["--seq-len", "0"])
    mine = make_tiny_model(tmp_path / "mine", tokenizer_dir, n_layers=1)  # a model dir heal.py did not make
    with pytest.raises(UserError, match="--export .*no heal.json"):
        run_heal(tmp_path, teacher_dir, tmp_path / "run", mine)
    assert (mine / "model.safetensors").exists() and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--batch-size 99999"):
        run_heal(tmp_path, teacher_dir, tmp_path / "run", "", "--batch-size", "99999", "--seq-len", "4096")
