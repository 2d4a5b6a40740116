"""schedule.py: the two metrics, SCD/CD/TD on constructed checkpoints, Metric 1 once per run, the probe cache."""

import json
import math

import pytest
import torch

import checkpoints
import data
import losses
import schedule
from model import load_model
from runtime import UserError
from schedule import Scheduler, cd_choice, metric1, metric2, scd_choice, td_choice


def logp(logits):
    return torch.log_softmax(logits, -1)


def explicit_kl(a_logits, b_logits):
    """token-mean KL(softmax a ‖ softmax b), written out in float64 probabilities"""
    p, q = torch.softmax(a_logits.double(), -1), torch.softmax(b_logits.double(), -1)
    return float((p * (p / q).log()).sum(-1).mean())


def test_metrics_are_token_mean_kls():
    a, b = torch.randn(7, 11) * 2, torch.randn(7, 11) * 2
    assert metric1(logp(a), logp(b)) == pytest.approx(explicit_kl(a, b), rel=1e-5)
    assert metric2(logp(b), logp(a)) == pytest.approx(explicit_kl(b, a), rel=1e-5)
    assert metric1(logp(a), logp(a)) == pytest.approx(0, abs=1e-6)
    assert metric1(torch.zeros(0, 11), torch.zeros(0, 11)) == 0
    # sliced over tokens: the same as one pass
    big_a, big_b = torch.randn(256 * 2 + 3, 5), torch.randn(256 * 2 + 3, 5)  # mean_kl's slices: 256 rows
    assert metric1(logp(big_a), logp(big_b)) == pytest.approx(explicit_kl(big_a, big_b), rel=1e-5)


def select(scheduler, stage, step, student=None):
    """scheduler.choose with `student` a function that gives its probe log-probs, and the schedule.jsonl row."""
    scheduler.probe_logp = lambda f: f()
    return scheduler.choose(stage, step, student), scheduler.records[-1]


class FakeCache:
    """Log-probs per checkpoint step, counting loads."""

    def __init__(self, table):
        self.table, self.loads = table, 0

    def load(self, step):
        self.loads += 1
        return self.table[step]


def constructed():
    """Student at logits a, best teacher (step 300) at b, far apart. Checkpoint 100 sits on the student, 300 on the
    best, 200 halfway: each end is far from one of the two, the middle is close to both, so SCD must pick 200."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 13, generator=g) * 3, torch.randn(9, 13, generator=g) * 3
    table = {100: logp(a), 200: logp((a + b) / 2), 300: logp(b)}
    index = {"steps": [100, 200, 300], "best": 300, "final": 300}
    return a, b, table, index


def test_scd_picks_the_known_argmin():
    a, b, table, index = constructed()
    chosen, record = select(Scheduler("scd", index, 3, FakeCache(table)), 0, 0, lambda: logp(a))
    assert chosen == 200
    rows = {c["ckpt"]: c for c in record["candidates"]}
    mid = (a + b) / 2
    for step, logits in ((100, a), (200, mid), (300, b)):
        assert rows[step]["metric1"] == pytest.approx(explicit_kl(b, logits), rel=1e-4, abs=1e-6)
        assert rows[step]["metric2"] == pytest.approx(explicit_kl(a, logits), rel=1e-4, abs=1e-6)
        assert rows[step]["sum"] == pytest.approx(rows[step]["metric1"] + rows[step]["metric2"])
    # each metric alone would choose an end, so the sum is what decides
    assert min(rows, key=lambda s: rows[s]["metric1"]) == 300 and min(rows, key=lambda s: rows[s]["metric2"]) == 100
    assert record["stage"] == 0 and record["chosen"] == 200 and record["schedule"] == "scd"
    json.dumps(record)  # one schedule.jsonl line
    # once the student has reached the best teacher, SCD moves to it
    assert select(Scheduler("scd", index, 3, FakeCache(table)), 1, 5, lambda: logp(b))[0] == 300


def test_scd_choice_ties_go_to_the_earlier_checkpoint():
    assert scd_choice({10: 1.0, 20: 0.5, 30: 0.5}, {10: 0.0, 20: 0.5, 30: 0.5}) == 10
    assert scd_choice({10: 1.0, 20: 0.5}, {10: 0.6, 20: 0.5}) == 20


def test_metric1_is_computed_once_per_run(monkeypatch):
    a, b, table, index = constructed()
    counts = {"m1": 0, "m2": 0, "student": 0}
    real1, real2 = schedule.metric1, schedule.metric2
    monkeypatch.setattr(schedule, "metric1", lambda *x: counts.__setitem__("m1", counts["m1"] + 1) or real1(*x))
    monkeypatch.setattr(schedule, "metric2", lambda *x: counts.__setitem__("m2", counts["m2"] + 1) or real2(*x))

    def student():
        counts["student"] += 1
        return logp(a + counts["student"] * (b - a) / 4)  # the student moves between stages

    sched = Scheduler("scd", index, 4, FakeCache(table))
    records = [select(sched, s, 10 * s, student)[1] for s in range(4)]
    assert counts == {"m1": 3, "m2": 12, "student": 4}  # Metric 1 once per candidate, Metric 2 per stage
    assert len({json.dumps([c["metric1"] for c in r["candidates"]]) for r in records}) == 1
    assert len({json.dumps([c["metric2"] for c in r["candidates"]]) for r in records}) == 4


def test_cd_walks_in_order_evenly():
    steps = [10, 20, 30, 40, 50]
    assert [cd_choice(steps, s, 5) for s in range(5)] == steps
    assert [cd_choice(steps, s, 10) for s in range(10)] == [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]
    three = [cd_choice(steps, s, 3) for s in range(3)]
    assert three == sorted(three) and three[-1] == 50 and len(set(three)) == 3
    assert cd_choice(steps, 0, 1) == 50
    sched = Scheduler("cd", {"steps": steps, "best": 30, "final": 50}, 5)
    assert [select(sched, s, s, lambda: pytest.fail("CD must not run the probe"))[0] for s in range(5)] == steps


def test_td_stays_put():
    index = {"steps": [10, 20, 30], "best": 20, "final": 30}
    for final, expect in ((False, 20), (True, 30)):
        sched = Scheduler("td", index, 4, final=final)
        assert [select(sched, s, s)[0] for s in range(4)] == [expect] * 4
    assert td_choice({"steps": [10, 20], "best": 10, "final": None}, final=True) == 20


def test_probe_items_fixed_subset():
    items = [{"id": str(i)} for i in range(50)]
    a, b = schedule.probe_items(items, 8, seed=0), schedule.probe_items(items, 8, seed=0)
    assert a == b and len(a) == 8 and [int(x["id"]) for x in a] == sorted(int(x["id"]) for x in a)
    assert a != schedule.probe_items(items, 8, seed=1)
    assert len(schedule.probe_items(items, 80, seed=0)) == 50


@pytest.fixture
def tiny_teacher_run(tmp_path, tokenizer_dir):
    """Three checkpoints of a tiny random teacher, written as sft.py writes them."""
    from conftest import make_tiny_model

    run = tmp_path / "teacher"
    tok = data.load_tokenizer(tokenizer_dir)
    for k, step in enumerate((2, 4, 6)):
        model = load_model(make_tiny_model(tmp_path / f"m{k}", tokenizer_dir, seed=k))
        checkpoints.save_checkpoint(run, step, model, tok, {"step": step, "val_loss": 3.0 - 0.1 * k})
    checkpoints.write_checkpoint_index(run, final=6)
    return run, tok


def test_probe_logprobs_match_full_forward(tiny_teacher_run):
    run, tok = tiny_teacher_run
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=3), 160)
    model = load_model(run / "step_000002")
    ours = schedule.probe_logprobs(model, items, tok.pad_id, 2, torch.device("cpu"))
    ref = []
    with torch.no_grad():
        for it in items:
            lp = torch.log_softmax(model(torch.tensor([it["input_ids"]]))[0, :-1], -1)
            ref.append(lp[torch.tensor(it["labels"][1:]) != -100])
    torch.testing.assert_close(ours, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_probe_cache_runs_each_checkpoint_once(tiny_teacher_run, tmp_path, monkeypatch):
    run, tok = tiny_teacher_run
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=6), 160)
    probe = schedule.probe_items(items, 3, seed=0)
    loads = []
    real_load = schedule.load_model
    monkeypatch.setattr(schedule, "load_model", lambda p, **kw: loads.append(p) or real_load(p, **kw))
    ckpts = checkpoints.list_checkpoints(run)
    cache = schedule.ProbeCache(tmp_path / "cache", probe, ckpts, "fp32", "cpu", tok.files).build(tok.pad_id, 2)
    assert len(loads) == 3 and sorted(p.name for p in cache.dir.iterdir()) == \
        ["step_000002.safetensors", "step_000004.safetensors", "step_000006.safetensors"]
    again = schedule.ProbeCache(tmp_path / "cache", probe, ckpts, "fp32", "cpu", tok.files).build(tok.pad_id, 2)
    assert again.dir == cache.dir and len(loads) == 3  # all cached: no model loaded
    n_tokens = sum(sum(1 for y in it["labels"][1:] if y != -100) for it in probe)
    assert cache.load(4).shape == (n_tokens, load_model(run / "step_000004").args.vocab_size)


def test_probe_cache_is_keyed_by_everything_its_values_depend_on(tiny_teacher_run, tmp_path):
    """Another probe, dtype, device kind, tokenizer or weight content is another cache dir; a touched file with the
    same bytes is not (the key is the content, not the mtime)."""
    run, tok = tiny_teacher_run
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=6), 160)
    probe = schedule.probe_items(items, 3, seed=0)
    ckpts = checkpoints.list_checkpoints(run)

    def key_dir(probe=probe, dtype="fp32", device="cpu", files=tuple(tok.files)):
        return schedule.ProbeCache(tmp_path / "cache", probe, ckpts, dtype, device, files).dir

    base = key_dir()
    assert key_dir() == base
    assert key_dir(probe=schedule.probe_items(items, 3, 1)) != base
    assert key_dir(dtype="bf16") != base
    assert key_dir(device="cuda:0") != base and key_dir(device="cuda:0") == key_dir(device="cuda:1")
    edited = tmp_path / "tok"
    edited.mkdir()
    for f in tok.files:
        (edited / f.name).write_bytes(f.read_bytes())
    assert key_dir(files=[edited / f.name for f in tok.files]) == base  # same bytes elsewhere: same key
    cfg = edited / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "x": 1}', 1))
    assert key_dir(files=[edited / f.name for f in tok.files]) != base
    weights_file = run / "step_000004" / "model.safetensors"
    weights_file.touch()
    assert key_dir() == base
    weights_file.write_bytes((run / "step_000002" / "model.safetensors").read_bytes())  # retrained in place
    assert key_dir() != base


def test_token_mean_kl_zero_probability_convention():
    """p = 0 terms are 0, as in losses.kl_rows, even for a -inf logit; q = 0 under p > 0 is +inf."""
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    a[:, 3] = float("-inf")  # p_3 = 0
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    keep = p > 0
    ref = float(torch.where(keep, p * (p.log() - q.log()), 0.0).sum(-1).mean())
    got = losses.mean_kl(logp(a), logp(b))
    assert got == pytest.approx(ref, rel=1e-5) and got == got
    b[1, 0] = float("-inf")  # q_0 = 0 on a token where p_0 > 0
    assert losses.mean_kl(logp(a), logp(b)) == float("inf")


def test_scd_never_chooses_a_non_finite_candidate():
    nan, inf = float("nan"), float("inf")
    assert scd_choice({10: nan, 20: 1.0, 30: 0.5}, {10: 0.0, 20: 0.5, 30: 2.0}) == 20
    assert scd_choice({10: 0.1, 20: 1.0}, {10: inf, 20: 0.5}) == 20
    with pytest.raises(UserError, match="not finite for any"):
        scd_choice({10: nan, 20: inf}, {10: 0.0, 20: 0.0})
    # a NaN in a checkpoint's probe log-probs: reported as non-finite in the record, and passed over
    a, b, table, index = constructed()
    table[200] = table[200].clone()
    table[200][0, 0] = nan
    chosen, record = select(Scheduler("scd", index, 3, FakeCache(table)), 0, 0, lambda: logp(a))
    assert chosen != 200
    rows = {c["ckpt"]: c for c in record["candidates"]}
    assert rows[200]["finite"] is False and rows[200]["sum"] is None and rows[200]["metric1"] is None
    assert "finite" not in rows[chosen] and rows[chosen]["sum"] == min(r["sum"] for r in rows.values()
                                                                       if r["sum"] is not None)
    json.dumps(record, allow_nan=False)  # valid JSON for schedule.jsonl
    assert "never chosen" in schedule.format_table(record, 300)


def test_scd_on_hand_built_checkpoints(tmp_path, tokenizer_dir):
    """Real checkpoints whose metrics are known, through the probe cache and the scheduler: U predicts the uniform
    distribution u (zero final norm), B is a sharp random model (the best, by val loss), M is B at half its logit
    scale. With the student at U: Metric 1 (B) = 0 and Metric 2 (U) = 0; Metric 1 (U) = log V − H(p_B) and Metric 2
    (B) = KL(u ‖ p_B), both about σ²/2 for logits of spread σ, while M is about σ²/8 from each, so SCD must take M.
    Every value is recomputed in float64 from the models' full forward passes."""
    from conftest import make_tiny_model

    tok = data.load_tokenizer(tokenizer_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=6), 80)
    run = tmp_path / "teacher"
    base = load_model(make_tiny_model(tmp_path / "b", tokenizer_dir, seed=9))
    models = {}
    for step, scale, val_loss in ((1, 0.0, 3.0), (2, 20.0, 2.5), (3, 40.0, 2.0)):  # U, M, B
        m = load_model(tmp_path / "b")
        with torch.no_grad():
            m.model.norm.weight.mul_(scale)
        checkpoints.save_checkpoint(run, step, m, tok, {"step": step, "val_loss": val_loss})
        models[step] = m
    index = checkpoints.write_checkpoint_index(run, final=3)
    assert index["best"] == 3

    def hand_logp(model):  # (N, V) float64 log-probs at every answer position, one unpadded item at a time
        rows = []
        with torch.no_grad():
            for it in items:
                lp = torch.log_softmax(model(torch.tensor([it["input_ids"]]))[0].double(), -1)
                rows += [lp[t] for t, y in enumerate(it["labels"][1:]) if y != -100]
        return torch.stack(rows)

    def kl(a, b):  # token-mean KL(a ‖ b) from float64 log-probs
        return float((a.exp() * (a - b)).sum(-1).mean())

    ref = {s: hand_logp(m) for s, m in models.items()}
    log_v = math.log(base.args.vocab_size)
    assert torch.allclose(ref[1], torch.full_like(ref[1], -log_v))  # U is exactly uniform
    m1 = {s: kl(ref[3], ref[s]) for s in ref}
    m2 = {s: kl(ref[1], ref[s]) for s in ref}
    entropy_b = float(-(ref[3].exp() * ref[3]).sum(-1).mean())
    assert m1[1] == pytest.approx(log_v - entropy_b, rel=1e-9) and m1[3] == 0 and m2[1] == 0
    sums = {s: m1[s] + m2[s] for s in ref}
    assert sums[2] < 0.75 * min(sums[1], sums[3])  # a clear winner, as the closed forms say

    probe = schedule.probe_items(items, 6, seed=0)
    cache = schedule.ProbeCache(tmp_path / "cache", probe, checkpoints.list_checkpoints(run), "fp32", "cpu", tok.files)
    cache.build(tok.pad_id, 4)
    student = models[1]
    student_logp = lambda: schedule.probe_logprobs(student, probe, tok.pad_id, 4, torch.device("cpu"))  # noqa: E731
    chosen, record = select(Scheduler("scd", index, 1, cache), 0, 0, student_logp)
    assert chosen == 2 == min(sums, key=sums.get)
    rows = {c["ckpt"]: c for c in record["candidates"]}
    for s in ref:
        assert rows[s]["metric1"] == pytest.approx(m1[s], rel=1e-4, abs=1e-5), s
        assert rows[s]["metric2"] == pytest.approx(m2[s], rel=1e-4, abs=1e-5), s


def test_schedule_cli_prints_the_table(tiny_teacher_run, tmp_path, capsys, tokenizer_dir):
    from conftest import make_tiny_model

    run, _ = tiny_teacher_run
    student = make_tiny_model(tmp_path / "student", tokenizer_dir, n_layers=1, dim=16, seed=7)
    schedule.main(["--teacher", str(run), "--student", str(student), "--probe-cache", str(tmp_path / "cache"),
                   "--probe-size", "3", "--train-size", "6", "--max-len", "96", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(s for s in lines if s.split()[:1] == ["checkpoint"])):]
    rows = {int(s.split()[0]): s.split() for s in table[2:]}
    assert sorted(rows) == [2, 4, 6]
    sums = {step: float(r[3]) for step, r in rows.items()}
    assert [s for s, r in rows.items() if "<--" in r] == [min(sums, key=sums.get)]
    assert float(rows[6][1]) == pytest.approx(0, abs=1e-4) and "(best)" in " ".join(rows[6])  # val_loss lowest
    for r in rows.values():
        assert float(r[3]) == pytest.approx(float(r[1]) + float(r[2]), abs=2e-4)


# -----------------------------------------------------------------------------
# beyond the paper: metric balance and forward-only (issue #16)


def test_balance_metrics_by_hand():
    m1, m2 = {1: 0.0, 2: 1.0, 3: 4.0}, {1: 20.0, 2: 10.0, 3: 0.0}
    # none: the plain sum 20, 11, 4
    b1, b2, used = schedule.balance_metrics(m1, m2)
    assert (b1, b2, used) == (m1, m2, {}) and scd_choice(b1, b2) == 3
    # spread: Metric 1 / 4 + Metric 2 / 20 = 1, 0.75, 1
    b1, b2, used = schedule.balance_metrics(m1, m2, "spread")
    assert used == {"metric_balance": "spread", "spread1": 4.0, "spread2": 20.0}
    assert {s: b1[s] + b2[s] for s in m1} == {1: 1.0, 2: 0.75, 3: 1.0} and scd_choice(b1, b2) == 2
    # weight 0.05: 0 + 1, 1 + 0.5, 4 + 0
    b1, b2, used = schedule.balance_metrics(m1, m2, "weight", 0.05)
    assert used == {"metric_balance": "weight", "metric2_weight": 0.05}
    assert {s: b1[s] + b2[s] for s in m1} == pytest.approx({1: 1.0, 2: 1.5, 3: 4.0}) and scd_choice(b1, b2) == 1
    # weight 1 is the paper's sum
    assert schedule.balance_metrics(m1, m2, "weight", 1.0)[:2] == (m1, m2)
    # a metric equal for every candidate has spread 0: divided by 1, the other metric decides
    b1, b2, used = schedule.balance_metrics({1: 2.0, 2: 2.0}, {1: 3.0, 2: 1.0}, "spread")
    assert used["spread1"] == 0.0 and b1 == {1: 2.0, 2: 2.0} and b2 == {1: 1.5, 2: 0.5} and scd_choice(b1, b2) == 2
    # a non-finite candidate does not stretch the spread
    _, _, used = schedule.balance_metrics({1: 0.0, 2: 1.0, 3: math.inf}, {1: 2.0, 2: 0.0, 3: 5.0}, "spread")
    assert used["spread1"] == 1.0 and used["spread2"] == 2.0


def test_scheduler_records_the_balance_and_default_record_is_unchanged():
    a, b, table, index = constructed()
    _, plain = select(Scheduler("scd", index, 3, FakeCache(table)), 0, 0, lambda: logp(a))
    assert set(plain) == {"stage", "step", "schedule", "chosen", "candidates"}  # the paper's record, as before
    assert all(set(c) == {"ckpt", "metric1", "metric2", "sum"} for c in plain["candidates"])
    chosen, rec = select(Scheduler("scd", index, 3, FakeCache(table), balance="spread"), 0, 0, lambda: logp(a))
    m1 = {c["ckpt"]: c["metric1"] for c in rec["candidates"]}
    m2 = {c["ckpt"]: c["metric2"] for c in rec["candidates"]}
    assert rec["metric_balance"] == "spread" and rec["forward_only"] is False
    assert rec["spread1"] == pytest.approx(max(m1.values()) - min(m1.values()))
    assert rec["spread2"] == pytest.approx(max(m2.values()) - min(m2.values()))
    terms = {c["ckpt"]: c["score_terms"] for c in rec["candidates"]}
    for s in m1:
        assert terms[s] == pytest.approx([m1[s] / rec["spread1"], m2[s] / rec["spread2"]])
    assert chosen == min(terms, key=lambda s: sum(terms[s]))
    # the raw metrics in the record are the paper's, whatever the balance
    assert [(c["metric1"], c["metric2"]) for c in rec["candidates"]] == \
        [(c["metric1"], c["metric2"]) for c in plain["candidates"]]
    # a huge Metric 2 weight makes SCD follow the student (checkpoint 100 sits on it), a zero weight the best
    for weight, chosen in ((100.0, 100), (0.0, 300)):
        sched = Scheduler("scd", index, 3, FakeCache(table), balance="weight", metric2_weight=weight)
        assert select(sched, 0, 0, lambda: logp(a))[0] == chosen


def test_forward_only_never_goes_back():
    a, b, table, index = constructed()
    # the student jumps to the best teacher, then back to where it started: the paper's SCD goes back to 200
    trajectory = [logp(b), logp(a)]
    paper = Scheduler("scd", index, 2, FakeCache(table))
    assert [select(paper, s, s, lambda: trajectory[s])[0] for s in range(2)] == [300, 200]
    fwd = Scheduler("scd", index, 2, FakeCache(table), forward_only=True)
    chosen = [select(fwd, s, s, lambda: trajectory[s]) for s in range(2)]
    assert [c for c, _ in chosen] == [300, 300]
    rec = chosen[1][1]
    assert rec["forward_only"] is True
    assert {c["ckpt"]: c["score_terms"] is None for c in rec["candidates"]} == {100: True, 200: True, 300: False}
    # on a resume the last choice comes back from the earlier stages' schedule.jsonl
    history = [{"stage": 0, "chosen": 100}, {"stage": 1, "chosen": 300}]
    resumed = Scheduler("scd", index, 3, FakeCache(table), forward_only=True, history=history)
    assert select(resumed, 1, 1, lambda: pytest.fail("a stage chosen before the resume is not chosen again"))[0] == 300
    assert select(resumed, 2, 2, lambda: logp(a))[0] == 300
    with pytest.raises(UserError, match="no teacher checkpoint is left"):
        select(Scheduler("scd", index, 2, FakeCache(table), forward_only=True, distinct=True,
                         history=[{"stage": 0, "chosen": 300}]), 1, 1, lambda: logp(a))


def test_schedule_cli_metric1_only_and_balance(tiny_teacher_run, tmp_path, capsys, tokenizer_dir):
    from conftest import make_tiny_model

    run, _ = tiny_teacher_run
    common = ["--teacher", str(run), "--probe-cache", str(tmp_path / "cache"), "--probe-size", "3",
              "--train-size", "6", "--max-len", "96", "--device", "cpu"]
    schedule.main([*common, "--metric1-only"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(s for s in lines if s.split()[:1] == ["checkpoint"])) + 2:]
    rows = {int(s.split()[0]): s.split() for s in table}
    # Metric 1 recomputed from each checkpoint's own forward on the same probe
    tok = data.load_tokenizer(tokenizer_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=6, seed=0), 96)
    probe = schedule.probe_items(items, 3, 0)
    lp = {s: schedule.probe_logprobs(load_model(run / checkpoints.checkpoint_name(s)), probe, tok.pad_id, 4,
                                     torch.device("cpu")) for s in rows}
    for s, r in rows.items():
        assert float(r[1]) == pytest.approx(metric1(lp[6], lp[s]), abs=1e-4)
        assert float(r[2]) == pytest.approx(json.loads((run / checkpoints.checkpoint_name(s) / "meta.json").read_text())
                                            ["val_loss"], abs=1e-4)
    assert "(best)" in " ".join(rows[6]) and "(final)" in " ".join(rows[6])
    student = make_tiny_model(tmp_path / "student", tokenizer_dir, n_layers=1, dim=16, seed=7)
    with pytest.raises(UserError, match="--student: --metric1-only"):
        schedule.main([*common, "--metric1-only", "--student", str(student)])
    with pytest.raises(UserError, match="--metric2-weight: is the w of --metric-balance weight"):
        schedule.main([*common, "--student", str(student), "--metric2-weight", "2"])
    schedule.main([*common, "--student", str(student), "--metric-balance", "spread"])
    out = capsys.readouterr().out
    assert '"metric_balance": "spread"' in out and "<--" in out
