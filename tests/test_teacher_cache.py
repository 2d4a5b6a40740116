"""teacher_cache.py and distill.py --teacher-cache on tiny random Llamas with the real tokenizer: the cached values
against transformers, distillation from an exact cache against online distillation, top-k with k = V and V − 1
against exact, the bucketed divergences against a float64 recomputation, and stale caches refused."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TEACHER_STEPS, make_teacher_runs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoints
import data
import distill
import losses
import teacher_cache
import weights
from model import load_model
from runtime import UserError

SIZES = ["--train-size", "8", "--max-len", "96"]


@pytest.fixture(scope="module")
def runs(module_tmp, tokenizer_dir):
    return make_teacher_runs(module_tmp("runs"), tokenizer_dir)


def argv(runs, out, *extra):
    """distill.py flags for a tiny run; AW's and SCD's own flags only where the run uses them (the script refuses
    a flag its run would ignore), and the probe cache only for an online SCD run."""
    root, init = runs
    extra = list(map(str, extra))
    sched = extra[extra.index("--schedule") + 1] if "--schedule" in extra else "scd"
    aw = ["--student-sft", str(root / "student"), "--aw-table", str(root / "no_table")] if "--no-aw" not in extra \
        else []
    scd = ["--probe-size", "3"] if sched == "scd" else []
    if sched == "scd" and "--teacher-cache" not in extra:
        scd += ["--probe-cache", str(out.parent / "probe_cache")]
    return ["--teacher", str(root / "teacher"), "--init", str(init), "--out", str(out), *aw, *scd,
            *SIZES, "--val-size", "2", "--batch-size", "4", "--stages", "3", "--stage-steps", "2",
            "--eval-batch-size", "4", "--log-every", "1", "--device", "cpu", "--lr", "3e-3",
            "--dtype", "fp32", "--eval-split", "none", *extra]


def build_argv(runs, out, *extra):
    return ["--teacher", str(runs[0] / "teacher"), "--out", str(out), "--tokenizer", str(runs[1]), *SIZES,
            "--batch-size", "3", "--probe-size", "3", "--device", "cpu", "--dtype", "fp32", *map(str, extra)]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_items(runs, max_len=96):
    tok = data.load_tokenizer(runs[1])
    return tok, data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=8, seed=0), max_len)[0]


def test_cached_values_match_transformers(runs, tmp_path):
    """Exact and top-k shards against log_softmax of transformers' logits at each item's answer positions."""
    root, _ = runs
    teacher_cache.main(build_argv(runs, tmp_path / "exact", "--form", "exact", "--precision", "fp32"))
    teacher_cache.main(build_argv(runs, tmp_path / "topk", "--form", "topk", "--top-k", "5", "--seeds", "0,1"))
    _, items = train_items(runs)
    manifest = json.loads((tmp_path / "topk" / "manifest.json").read_text())
    probe_ids = set(manifest["settings"]["probe_ids"])
    assert 3 <= len(probe_ids) <= 6
    for step in TEACHER_STEPS:
        hf = AutoModelForCausalLM.from_pretrained(root / "teacher" / checkpoints.checkpoint_name(step)).eval()
        exact = load_file(tmp_path / "exact" / f"{checkpoints.checkpoint_name(step)}.safetensors")
        topk = load_file(tmp_path / "topk" / f"{checkpoints.checkpoint_name(step)}.safetensors")
        assert len(exact) == 2 * len(items) and len(topk) == 4 * len(items) + len(probe_ids)
        for it in items:
            with torch.no_grad():
                logits = hf(torch.tensor([it["input_ids"]])).logits[0, :-1].double()
            pos = torch.tensor(it["labels"][1:]) != -100
            want = torch.log_softmax(logits[pos], -1)  # (n, V)
            gold = want.gather(-1, torch.tensor(it["labels"][1:])[pos][:, None])[:, 0]
            key = it["id"]
            torch.testing.assert_close(exact[f"logp/{key}"].double(), want, atol=2e-5, rtol=0)
            torch.testing.assert_close(exact[f"gold/{key}"].double(), gold, atol=2e-5, rtol=0)
            torch.testing.assert_close(topk[f"gold/{key}"].double(), gold, atol=2e-5, rtol=0)
            top = want.topk(5, -1)
            assert torch.equal(topk[f"indices/{key}"].long(), top.indices)
            torch.testing.assert_close(topk[f"values/{key}"].double(), top.values, atol=0.02, rtol=0)  # fp16
            rest = torch.log1p(-top.values.exp().sum(-1))
            torch.testing.assert_close(topk[f"tail/{key}"].double(), rest, atol=2e-5, rtol=1e-5)
            if key in probe_ids:
                torch.testing.assert_close(topk[f"probe/{key}"].double(), want, atol=0.02, rtol=0)


def test_storage_estimate_is_printed_before_writing(runs, tmp_path, capsys):
    teacher_cache.main(build_argv(runs, tmp_path / "c", "--form", "exact", "--precision", "fp16"))
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if "MiB per checkpoint" in line)
    m = re.search(r"([\d.]+) MiB per checkpoint; writing 3 of 3 checkpoints, ([\d.]+) MiB", lines[head])
    assert m, lines[head]
    _, items = train_items(runs)
    n_tok = sum(sum(1 for y in it["labels"][1:] if y != -100) for it in items)
    estimate = n_tok * (49152 * 2 + 4)  # fp16 log-probs + fp32 gold log-prob per answer token
    assert m.group(1) == f"{estimate / 2 ** 20:.1f}" and m.group(2) == f"{3 * estimate / 2 ** 20:.1f}"
    sizes = [f.stat().st_size for f in (tmp_path / "c").glob("step_*.safetensors")]
    assert len(sizes) == 3 and all(0 < s - estimate < 4096 for s in sizes)  # + the JSON header
    # a second build finds every shard current and writes nothing
    teacher_cache.main(build_argv(runs, tmp_path / "c", "--form", "exact", "--precision", "fp16"))
    assert "writing 0 of 3 checkpoints" in capsys.readouterr().out


EXACTNESS = {  # name -> (cache build flags, distill flags)
    "exact_scd_aw_fkl": (("--form", "exact", "--precision", "fp32"), ("--schedule", "scd", "--aw")),
    "exact_cd_jsd_T2": (("--form", "exact", "--precision", "fp32"),
                        ("--schedule", "cd", "--no-aw", "--loss", "jsd", "--temperature", "2")),
    # k = V: the buckets are the vocabulary itself, so top-k must distil exactly too, at any temperature
    "topk_V_scd_aw_rkl_T2": (("--form", "topk", "--top-k", "49152", "--precision", "fp32"),
                             ("--schedule", "scd", "--aw", "--loss", "rkl", "--temperature", "2")),
}
WEIGHT_ATOL = 1e-5  # final weights, after 6 AdamW steps at lr 3e-3 (each step moves a weight by up to ~3e-3)


@pytest.mark.parametrize("case", list(EXACTNESS))
def test_cache_distills_as_online(case, runs, tmp_path):
    build, flags = EXACTNESS[case]
    teacher_cache.main(build_argv(runs, tmp_path / "cache", *build))
    distill.main(argv(runs, tmp_path / "online", *flags))
    distill.main(argv(runs, tmp_path / "cached", *flags, "--teacher-cache", tmp_path / "cache"))
    assert not (tmp_path / "probe_cache").exists() or "scd" in flags  # only the online run fills a probe cache
    online, cached = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("online", "cached"))
    steps = [r for r in online if "loss" in r]
    assert len(steps) == 6 and len(online) == len(cached)
    for a, b in zip(online, cached):
        assert a.keys() == b.keys()
        for k in ("loss", "kd", "ce", "w", "val_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a, b)  # KL of fp32 log-probs
        if "grad_norm" in a:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    sched = [read_jsonl(tmp_path / d / "schedule.jsonl") for d in ("online", "cached")]
    assert [r["chosen"] for r in sched[0]] == [r["chosen"] for r in sched[1]]
    for a, b in zip(*sched):
        for ca, cb in zip(a["candidates"], b["candidates"]):
            for k in ("metric1", "metric2", "sum"):
                # a KL of ~0.01 summed over 49,152 fp32 terms: 1.1e-7 apart seen at 2 threads on a Zen 2 CPU
                assert (ca[k] is None and cb[k] is None) or cb[k] == pytest.approx(ca[k], rel=1e-5, abs=1e-6)
    wa, wb = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("online", "cached"))
    moved = max(float((wa[k] - load_file(runs[1] / "model.safetensors")[k]).abs().max()) for k in wa)
    assert moved > 100 * WEIGHT_ATOL  # training moved the weights far more than the tolerance
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=WEIGHT_ATOL, rtol=0)


def test_no_teacher_model_is_loaded_with_a_cache(runs, tmp_path, monkeypatch):
    teacher_cache.main(build_argv(runs, tmp_path / "cache", "--form", "topk", "--top-k", "8"))
    loaded = []
    import distill_run
    import teachers
    real = distill_run.load_model
    for module in (distill_run, teachers, weights):  # everywhere distill.py loads a model from
        monkeypatch.setattr(module, "load_model", lambda path, **kw: loaded.append(str(path)) or real(path, **kw))
    distill.main(argv(runs, tmp_path / "run", "--schedule", "scd", "--aw", "--teacher-cache", tmp_path / "cache"))
    assert loaded and not any("teacher" in p for p in loaded), loaded
    assert not (tmp_path / "probe_cache").exists()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 6 and all(r["kd"] > 0 and 0 < r["w"] < 1 for r in rows)


V_SMALL = 40


def topk_of(t_logits, k):
    logp = torch.log_softmax(t_logits.float(), -1)
    values, indices = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(-1, indices, float("-inf")), -1)
    return losses.TopK(values, indices, tail, t_logits.shape[-1])


@pytest.mark.parametrize("loss", sorted(losses.DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("k", [V_SMALL, V_SMALL - 1])
def test_topk_with_full_or_one_token_tail_equals_exact(loss, temperature, k):
    """k = V and k = V − 1 lose nothing: the divergence and its gradient equal the exact ones, at any T."""
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(11, V_SMALL, generator=g)).requires_grad_()
    t = 3 * torch.randn(11, V_SMALL, generator=g)
    y = torch.randint(0, V_SMALL, (11,), generator=g)
    params = {"jsd": {"beta": 0.3}, "skew_fkl": {"lam": 0.2}, "skew_rkl": {"lam": 0.2}}.get(loss, {})
    head = lambda x: x  # noqa: E731
    kd, ce = losses.token_losses(s, head, t, y, loss, temperature, **params)
    (grad,) = torch.autograd.grad(kd.sum() + ce.sum(), s)
    kd2, ce2 = losses.token_losses(s, head, topk_of(t, k), y, loss, temperature, **params)
    (grad2,) = torch.autograd.grad(kd2.sum() + ce2.sum(), s)
    torch.testing.assert_close(kd2, kd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce2, ce)
    torch.testing.assert_close(grad2, grad, atol=1e-5, rtol=1e-5)


def f64_bucketed_fkl(s, t, k, temperature):
    """Forward KL between k + 1 buckets, from float64 probabilities: the teacher's k most likely tokens each, the
    rest in one; the teacher's tail tempered as V − k equal tokens."""
    s, t = s.double(), t.double()
    V = s.shape[-1]
    p1 = torch.softmax(t, -1)
    top = p1.topk(k, -1).indices
    in_top = torch.zeros_like(p1, dtype=torch.bool).scatter(-1, top, True)
    m = (p1 * ~in_top).sum(-1)
    pt = torch.cat([p1.gather(-1, top) ** (1 / temperature), ((V - k) * (m / (V - k)) ** (1 / temperature))[:, None]],
                   -1)
    pt = pt / pt.sum(-1, keepdim=True)
    q = torch.softmax(s / temperature, -1)
    qt = torch.cat([q.gather(-1, top), (q * ~in_top).sum(-1, keepdim=True)], -1)
    return (pt * (pt.log() - qt.log())).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_fkl_against_float64_and_below_the_full_kl(temperature):
    g = torch.Generator().manual_seed(1)
    s = 2 * torch.randn(13, V_SMALL, generator=g)
    t = 2 * torch.randn(13, V_SMALL, generator=g)
    y = torch.randint(0, V_SMALL, (13,), generator=g)
    for k in (1, 4, 16):
        kd, _ = losses.token_losses(s, lambda x: x, topk_of(t, k), y, "fkl", temperature)
        torch.testing.assert_close(kd.double(), f64_bucketed_fkl(s, t, k, temperature), atol=1e-5, rtol=1e-5)
        if temperature == 1.0:  # data-processing inequality: every bucketed f-divergence is below the full one
            for loss in losses.DIVERGENCES:
                full, _ = losses.token_losses(s, lambda x: x, t, y, loss)
                bucketed, _ = losses.token_losses(s, lambda x: x, topk_of(t, k), y, loss)
                assert (bucketed <= full + 1e-5).all() and (bucketed < full - 1e-4).any(), (loss, k)


def test_stale_or_foreign_cache_is_refused(runs, tmp_path):
    root, _ = runs
    cache = tmp_path / "cache"
    teacher_cache.main(build_argv(runs, cache, "--form", "topk", "--top-k", "4"))
    cases = {
        "max_len": (["--max-len", "80"], "built for other --max-len \\(96; this run has 80\\)"),
        "data": (["--train-size", "7"], "built for other training items"),
        "dtype": (["--dtype", "bf16"], "built for other --dtype \\(fp32; this run has bf16\\)"),
        "probe": (["--seed", "3", "--probe-size", "5"], "without the full log-probs of probe example"),
    }
    for name, (extra, match) in cases.items():
        a = argv(runs, tmp_path / name, "--schedule", "scd", "--teacher-cache", cache)
        for i in range(0, len(extra), 2):
            a = a[:a.index(extra[i]) + 1] + [extra[i + 1]] + a[a.index(extra[i]) + 2:] if extra[i] in a \
                else a + extra[i:i + 2]
        with pytest.raises(UserError, match=match):
            distill.main(a)
        assert not (tmp_path / name).exists()  # refused before anything was written
    # a retrained checkpoint (new weights in step 4): refused as a one-line error with exit code 2
    ckpt = root / "teacher" / "step_000004"
    saved = (ckpt / "model.safetensors").read_bytes()
    try:
        model = load_model(ckpt)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
        checkpoints.save_checkpoint(root / "teacher", 4, model, data.load_tokenizer(ckpt), json.loads(
            (ckpt / "meta.json").read_text()))
        r = subprocess.run([sys.executable, "distill.py", *argv(runs, tmp_path / "changed", "--teacher-cache", cache)],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [
            f"error: --teacher-cache {cache}: teacher checkpoint 4 changed since the cache was built; rebuild it "
            f"with python teacher_cache.py --out {cache} and this run's flags"]
        # the rebuild redoes that checkpoint only, and the run then goes through
        out = subprocess.run([sys.executable, "teacher_cache.py", *build_argv(runs, cache, "--form", "topk",
                                                                            "--top-k", "4")],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert "writing 1 of 3 checkpoints" in out
        distill.main(argv(runs, tmp_path / "changed", "--teacher-cache", cache))
    finally:
        (ckpt / "model.safetensors").write_bytes(saved)
    # TD needs only its own checkpoint: a cache of the final one serves it, and refuses SCD
    teacher_cache.main(build_argv(runs, tmp_path / "final_only", "--form", "exact", "--steps", "final"))
    assert [f.name for f in (tmp_path / "final_only").glob("step_*")] == ["step_000006.safetensors"]
    distill.main(argv(runs, tmp_path / "td", "--schedule", "td", "--td-ckpt", "final", "--teacher-cache",
                      tmp_path / "final_only"))
    with pytest.raises(UserError, match="has no values for teacher checkpoint 2"):
        distill.main(argv(runs, tmp_path / "scd", "--schedule", "scd", "--teacher-cache", tmp_path / "final_only"))
    with pytest.raises(UserError, match="no manifest.json"):
        distill.main(argv(runs, tmp_path / "none", "--teacher-cache", tmp_path / "nowhere"))
