"""schedule.py: the two metrics, SCD/CD/TD on constructed checkpoints, Metric 1 once per run, the probe cache."""

import json

import pytest
import torch

import data
import schedule
import sft
from model import load_model
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
    big_a, big_b = torch.randn(schedule.PROBE_ROWS * 2 + 3, 5), torch.randn(schedule.PROBE_ROWS * 2 + 3, 5)
    assert metric1(logp(big_a), logp(big_b)) == pytest.approx(explicit_kl(big_a, big_b), rel=1e-5)


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
    chosen, record = Scheduler("scd", index, 3, FakeCache(table)).select(0, 0, lambda: logp(a))
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
    assert Scheduler("scd", index, 3, FakeCache(table)).select(1, 5, lambda: logp(b))[0] == 300


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
    records = [sched.select(s, 10 * s, student)[1] for s in range(4)]
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
    assert [sched.select(s, s, lambda: pytest.fail("CD must not run the probe"))[0] for s in range(5)] == steps


def test_td_stays_put():
    index = {"steps": [10, 20, 30], "best": 20, "final": 30}
    for final, expect in ((False, 20), (True, 30)):
        sched = Scheduler("td", index, 4, final=final)
        assert [sched.select(s, s)[0] for s in range(4)] == [expect] * 4
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
        sft.save_checkpoint(run, step, model, tok, {"step": step, "val_loss": 3.0 - 0.1 * k})
    sft.write_checkpoint_index(run, final=6)
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
    ckpts = sft.list_checkpoints(run)
    cache = schedule.ProbeCache(tmp_path / "cache", probe, ckpts).build(tok.pad_id, 2, torch.device("cpu"))
    assert len(loads) == 3 and sorted(p.name for p in cache.dir.iterdir()) == \
        ["step_000002.safetensors", "step_000004.safetensors", "step_000006.safetensors"]
    again = schedule.ProbeCache(tmp_path / "cache", probe, ckpts).build(tok.pad_id, 2, torch.device("cpu"))
    assert again.dir == cache.dir and len(loads) == 3  # all cached: no model loaded
    n_tokens = sum(sum(1 for y in it["labels"][1:] if y != -100) for it in probe)
    assert cache.load(4).shape == (n_tokens, load_model(run / "step_000004").args.vocab_size)
    # another probe set or a retrained checkpoint is another key
    assert schedule.ProbeCache(tmp_path / "cache", schedule.probe_items(items, 3, 1), ckpts).dir != cache.dir
    (run / "step_000004" / "model.safetensors").touch()
    assert schedule.ProbeCache(tmp_path / "cache", probe, ckpts).dir != cache.dir


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
