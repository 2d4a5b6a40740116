"""sft.py and evaluate.py on a tiny random Llama carrying the real tokenizer, trained on real NCBI-disease text."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoints
import data
import evaluate
import footsteps
import runtime
import sft
import train
from model import load_model, save_model
from runtime import UserError

ROOT = sft.Path(sft.__file__).resolve().parent


def run_sft(model_dir, out, *extra):
    argv = ["--role", "teacher", "--model", str(model_dir), "--out", str(out), "--train-size", "16",
            "--val-size", "4", "--batch-size", "4", "--max-len", "160", "--lr", "3e-3", "--log-every", "1",
            "--eval-batch-size", "4", *map(str, extra)]
    sft.main(argv)


def test_end_to_end_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_sft(tiny_model_dir, out, "--epochs", "4", "--save-every", "5")
    steps = [s for s, _ in checkpoints.list_checkpoints(out)]
    assert steps == [5, 10, 15, 16]
    index = json.loads((out / "checkpoints.json").read_text())
    assert index["steps"] == steps and index["final"] == 16 and index["best"] in steps
    metas = {s: json.loads((p / "meta.json").read_text()) for s, p in checkpoints.list_checkpoints(out)}
    for s, meta in metas.items():
        for key in ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "val_metric", "config"):
            assert key in meta, key
        assert meta["step"] == s and meta["config"]["lr"] == 3e-3
    assert index["best"] == min(steps, key=lambda s: metas[s]["val_loss"])
    # the paper's pick is by the validation task metric: the highest, the earlier on a tie
    top = max(metas[s]["val_metric"] for s in steps)
    assert checkpoints.best_by_metric(out) == out / f"step_{min(s for s in steps if metas[s]['val_metric'] == top):06d}"
    # resume state lives in the newest checkpoint only
    assert [s for s, p in checkpoints.list_checkpoints(out) if (p / "trainer_state.safetensors").exists()] == [16]
    # every checkpoint loads in transformers as it is
    for s, p in checkpoints.list_checkpoints(out):
        hf, info = AutoModelForCausalLM.from_pretrained(p, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 16 and all(r["tok_per_s"] > 0 for r in rows if "loss" in r)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])  # it learns: from ln(V) = 10.8, the last epoch is clearly lower
    config = json.loads((out / "config.json").read_text())
    assert config["role"] == "teacher"
    # the preset's auto, resolved
    assert config["dtype"] == ("bf16" if runtime.fast_bf16(torch.device("cpu")) else "fp32")


def test_dtype_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch, capsys):
    cpu = torch.device("cpu")
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2"):  # no bf16 matmul kernels
        assert not runtime.fast_bf16(cpu)
    for fast, auto in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(runtime, "fast_bf16", lambda device: fast)
        assert runtime.resolve_dtype("auto", cpu) == auto
        assert runtime.resolve_dtype("fp32", cpu) == "fp32"
        assert runtime.resolve_dtype("bf16", cpu) == "bf16"  # kept as asked, with a warning where it is slow
        assert ("no bf16 matmul kernels" in capsys.readouterr().err) == (not fast)


def test_grad_accum_does_not_change_the_gradient(tiny_model_dir):
    tok = data.load_tokenizer(tiny_model_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=6), 160)
    model = load_model(tiny_model_dir)

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss, _, _ = train.train_step(model, [data.collate(m, tok.pad_id) for m in micro], torch.device("cpu"),
                                    "fp32", clip=1e9)
        return loss, [p.grad.clone() for p in model.parameters()]

    loss_a, g_a = grads([items])
    loss_b, g_b = grads([items[:2], items[2:3], items[3:]])  # uneven micro-batches on purpose
    assert abs(loss_a - loss_b) < 1e-5
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # and it is a token mean over the whole batch, not a mean of per-micro-batch means
    loss_c, _ = grads([items[:1]])
    assert abs(loss_c - loss_a) > 1e-4


def test_resume_ends_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    args = ("--epochs", "2", "--save-every", "3")
    run_sft(tiny_model_dir, tmp_path / "straight", *args)

    real_update = train.apply_update

    def crash_at_step_5(optimizer, lr, step, loss, grad_norm):
        if step == 4:  # 0-based: steps 1..4 are done, the last checkpoint is step 3
            raise RuntimeError("simulated crash")
        real_update(optimizer, lr, step, loss, grad_norm)

    monkeypatch.setattr(sft, "apply_update", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sft(tiny_model_dir, tmp_path / "resumed", *args)
    monkeypatch.setattr(sft, "apply_update", real_update)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "resumed")] == [3]
    run_sft(tiny_model_dir, tmp_path / "resumed", *args, "--resume")

    a = load_file(tmp_path / "straight" / "step_000008" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "step_000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, rows) if "loss" in r]
    assert losses("straight") == losses("resumed")


def test_out_dir_holding_a_run_is_refused(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path / "run", "--max-steps", "1")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run_sft(tiny_model_dir, tmp_path / "run", "--max-steps", "1")
    with pytest.raises(UserError, match="--resume: .* has lr=0.003 but this run has lr=0.1"):
        run_sft(tiny_model_dir, tmp_path / "run", "--max-steps", "1", "--resume", "--lr", "0.1")


def test_resume_sweeps_what_a_killed_run_was_writing(tmp_path):
    """A kill -9 mid-save leaves a .tmp-* dir beside the checkpoints (out/, or out/resume/ in distill.py); the next
    --resume removes every one and leaves complete checkpoints and other files alone."""
    out = tmp_path / "run"
    config = {"lr": 0.1}
    checkpoints.prepare_out_dir(out, config, resume=False, overwrite=False)
    stale = [out / ".tmp-step_000004-ab12", out / "resume" / ".tmp-step_000002-cd34", out / "aw_anchor" / ".tmp-x"]
    for path in stale:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "model.safetensors").write_bytes(b"half")
    (out / ".tmp-config.json-ef56").write_text("{")
    kept = [out / "resume" / "step_000002" / "meta.json", out / "metrics.jsonl"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    checkpoints.prepare_out_dir(out, config, resume=True, overwrite=False)
    assert not [p for p in out.rglob(".tmp-*")]
    assert all(p.read_text() == "{}" for p in kept)


# every flag that changes what the run computes, with a value other than run_sft's
RESULT_FLAGS = {"lr": "0.1", "warmup": "0.2", "weight_decay": "0.1", "max_steps": "2", "seed": "1",
                "grad_accum": "2", "batch_size": "2", "max_len": "128", "train_size": "12", "val_size": "2",
                "epochs": "3", "save_every": "1", "eval_max_new_tokens": "4", "task": "bc5cdr", "role": "student",
                "eval_batch_size": "2"}


def test_resume_refuses_any_result_changing_flag_by_name(tiny_model_dir, tmp_path):
    """--resume compares every resolved flag except the few that do not change results, names the first that
    differs, and leaves the run's config.json as it was; --log-every may differ. --eval-batch-size may not: it batches
    the no-grad passes (SCD's probe, AW's anchor) whose rounding can flip a near tie."""
    out = tmp_path / "run"
    run_sft(tiny_model_dir, out, "--max-steps", "1")
    saved = (out / "config.json").read_bytes()
    for key, value in RESULT_FLAGS.items():
        old = json.loads(saved)[key]
        with pytest.raises(UserError, match=f"^--resume: {re.escape(str(out))}/config.json has {key}={old!r} but "
                                            f"this run has {key}=.* resume with the same flags$"):
            run_sft(tiny_model_dir, out, "--max-steps", "1", "--resume", f"--{key.replace('_', '-')}", value)
        assert (out / "config.json").read_bytes() == saved, key
    run_sft(tiny_model_dir, out, "--max-steps", "1", "--resume", "--log-every", "3")
    assert (out / "config.json").read_bytes() == saved  # the record of the run as it was started


def test_resume_refuses_edited_data(tiny_model_dir, tmp_path):
    """The same flags over an edited data file: the examples' fingerprint differs, and the refusal says which."""
    rows = [{"prompt": f"Name {i}?", "response": f"item {i}"} for i in range(12)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ("--task", "jsonl", "--data", str(train), "--max-steps", "1")
    run_sft(tiny_model_dir, tmp_path / "run", *flags)
    rows[3]["response"] = "edited"  # its id stays train.jsonl:4
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="config.json has inputs.train="):
        run_sft(tiny_model_dir, tmp_path / "run", *flags, "--resume")


def test_lr_schedule():
    assert train.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert train.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert train.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    lrs = [train.lr_at(s, 100, 10, 1.0) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("answers", [None, {"yes": "yes, it does", "no": "no", "maybe": "maybe not at all"}])
def test_pubmedqa_scoring_matches_transformers(tiny_model_dir, tmp_path, monkeypatch, answers):
    """Each label's summed log-prob equals transformers' on prompt + label. The real labels are one token each;
    the second case makes two of them several tokens long, so they continue from the prompt's KV cache."""
    if answers is not None:
        monkeypatch.setattr(data, "format_answer", lambda task, gold: answers[gold])
    tok = data.load_tokenizer(tiny_model_dir)
    examples = data.load_examples("pubmedqa", "val", limit=3)
    model = load_model(tiny_model_dir)
    with torch.no_grad():  # weights ~ N(0, 0.5): peaked, position-sensitive outputs (at 0.02 they are near uniform)
        for p in model.parameters():
            p.mul_(25 if p.dim() >= 2 else 1)
    save_model(model, tmp_path / "sharp")
    ours = evaluate.label_logprobs(model, tok, examples, list(data.PUBMEDQA_LABELS), batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sharp").eval()
    lengths = set()
    for i, ex in enumerate(examples):
        prompt = data.encode_prompt(tok, ex)
        for j, lab in enumerate(data.PUBMEDQA_LABELS):
            ids = tok.encode(data.format_answer("pubmedqa", lab))
            lengths.add(len(ids))
            with torch.no_grad():
                logp = hf(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            ref = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids))
            assert abs(float(ours[i, j]) - ref) < 1e-3
    assert (lengths == {1}) == (answers is None)


def test_evaluate_cli_writes_metrics_and_predictions(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(tiny_model_dir), "--task",
                        "ncbi_disease", "--split", "test", "--limit", "4", "--max-new-tokens", "8", "--out",
                        str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["n"] == 4 and 0.0 <= printed["main"] <= 1.0
    rows = [json.loads(s) for s in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
    assert [set(row) for row in rows] == [{"id", "prediction", "gold", "correct"}] * 4


def test_sft_bad_flags_are_one_line_errors(tiny_model_dir, tmp_path):
    for flags, msg in [(["--batch-size", "0"], "--batch-size must be positive"),
                       (["--max-steps", "-3"], "--max-steps must be >= 0"),
                       (["--task", "nope"], "nope")]:
        r = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(tiny_model_dir), "--out",
                            str(tmp_path / "x"), *flags], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


def test_per_example_options_match_transformers(tiny_model_dir, tmp_path):
    """Options of a multiple-choice file, different per example and of different token lengths: each one's summed
    log-prob, with its end-of-turn token, equals transformers' on prompt + option + end; a row with fewer options
    scores -inf in the columns it lacks, and evaluate() predicts each row's best option."""
    tok = data.load_tokenizer(tiny_model_dir)
    path = tmp_path / "mc.jsonl"
    rows = [{"prompt": "Which is a disease? - cancer - aspirin", "response": "cancer",
             "choices": ["cancer", "aspirin", "breast cancer of the left side"]},
            {"prompt": "Colour of the sky?", "response": "blue", "choices": ["blue", "dark green"]},
            {"prompt": "Pick one", "response": "b", "choices": ["a", "b", "c d e f"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = data.load_examples("jsonl", "test", data_file=path)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(25 if p.dim() >= 2 else 1)
    save_model(model, tmp_path / "sharp")
    options = [list(ex.choices) for ex in examples]
    ours = evaluate.label_logprobs(model, tok, examples, options, batch_size=2, task="jsonl", end=True)
    assert ours.shape == (3, 3) and ours[1, 2] == float("-inf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sharp").eval()
    lengths = set()
    for i, ex in enumerate(examples):
        prompt = data.encode_prompt(tok, ex)
        for j, option in enumerate(ex.choices):
            ids = tok.encode(option) + [tok.eos_id]
            lengths.add(len(ids))
            with torch.no_grad():
                logp = hf(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            ref = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids))
            assert abs(float(ours[i, j]) - ref) < 1e-3, (i, j)
    assert len(lengths) > 2  # options of several token lengths share a batch
    metrics, out = evaluate.evaluate(model, tok, "jsonl", examples, batch_size=2)
    best = [ex.choices[k] for ex, k in zip(examples, ours.argmax(-1).tolist())]
    assert [r["prediction"] for r in out] == best
    assert metrics["accuracy"] == sum(b == ex.gold for b, ex in zip(best, examples)) / 3


# -----------------------------------------------------------------------------
# where the footsteps are (issue #16): even (the paper), geometric, at equal shares of the val-loss drop


def test_spacing_rules_by_hand():
    assert footsteps.even_steps(16, 5) == [5, 10, 15, 16]  # the paper's (and the default's) rule
    assert footsteps.spaced_steps("even", 16, 3) == [6, 12, 16]  # ceil(16 / 3) = 6
    # geometric: round(total^(k/n)); 100^(1/4) = 3.16, 100^(1/2) = 10, 100^(3/4) = 31.6
    assert footsteps.geometric_steps(100, 4) == [3, 10, 32, 100]
    # 20^(k/10) = 1.35 1.82 2.46 3.31 4.47 6.03 8.14 10.99 14.82 20: collisions move up by one
    assert footsteps.geometric_steps(20, 10) == [1, 2, 3, 4, 5, 6, 8, 11, 15, 20]
    assert footsteps.geometric_steps(5, 5) == [1, 2, 3, 4, 5] and footsteps.geometric_steps(7, 1) == [7]
    with pytest.raises(UserError, match="--checkpoints 6: geometric spacing needs 1 to 5"):
        footsteps.geometric_steps(5, 6)
    # val loss 10 at the start, lowest 4 at step 8: shares of the drop 6 at 8, 6 and 4 -> first steps 2, 4, 8, + final
    curve = {0: 10.0, 2: 8.0, 4: 5.0, 6: 4.5, 8: 4.0, 10: 4.2}
    assert footsteps.val_loss_steps(curve, 3) == [2, 4, 8, 10]
    assert footsteps.val_loss_steps(curve, 6) == [2, 4, 8, 10]  # levels 9, 8 both first reached at 2; 7, 6, 5 at 4
    assert footsteps.val_loss_steps(curve, 1) == [8, 10]
    assert footsteps.val_loss_steps({0: 3.0, 2: 3.5, 4: 3.2}, 3) == [4]  # no drop: only the final step
    # n of a run's checkpoints by the same rules: steps 7, 14, ..., 63 and 68
    steps = [7, 14, 21, 28, 35, 42, 49, 56, 63, 68]
    assert footsteps.subset_steps(steps, 3, "even") == [21, 42, 68]  # targets 23, 45, 68
    assert footsteps.subset_steps(steps, 10, "even") == steps
    assert footsteps.subset_steps(steps, 3, "geometric") == [7, 14, 68]  # targets 4, 17, 68
    assert footsteps.subset_steps(steps, 1, "geometric") == [68]
    with pytest.raises(UserError, match="fewer than 5 distinct"):  # targets 2, 5, 13, 29, 68: 2 and 5 both -> 7
        footsteps.subset_steps(steps, 5, "geometric")
    with pytest.raises(UserError, match="--candidates 11: the teacher run has 10"):
        footsteps.subset_steps(steps, 11, "even")


def test_geometric_spacing_run(tiny_model_dir, tmp_path):
    out = tmp_path / "geo"
    run_sft(tiny_model_dir, out, "--epochs", "4", "--spacing", "geometric", "--checkpoints", "4")  # 16 steps
    # 16^(1/4) = 2, 16^(1/2) = 4, 16^(3/4) = 8
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 4, 8, 16]
    index = json.loads((out / "checkpoints.json").read_text())
    assert index["steps"] == [2, 4, 8, 16] and index["final"] == 16 and index["spacing"] == "geometric"
    with pytest.raises(UserError, match="--save-every: places even checkpoints; --spacing geometric"):
        run_sft(tiny_model_dir, tmp_path / "x", "--spacing", "geometric", "--save-every", "2")
    with pytest.raises(UserError, match="--eval-every: decides --spacing val_loss"):
        run_sft(tiny_model_dir, tmp_path / "x", "--eval-every", "2")
    with pytest.raises(UserError, match="--checkpoints 0: out of range"):
        run_sft(tiny_model_dir, tmp_path / "x", "--checkpoints", "0")
    assert not (tmp_path / "x").exists()


def test_val_loss_spacing_run(tiny_model_dir, tmp_path):
    out = tmp_path / "val"
    run_sft(tiny_model_dir, out, "--epochs", "4", "--spacing", "val_loss", "--checkpoints", "3", "--eval-every", "2",
            "--dtype", "fp32")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["val_loss"] for r in rows if r.get("eval")}
    assert sorted(curve) == [0, 2, 4, 6, 8, 10, 12, 14, 16]  # the start, then every --eval-every steps
    # the start's loss is the untrained model's, scored independently here
    tok = data.load_tokenizer(tiny_model_dir)
    val, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "val", limit=4, seed=0), 160)
    start = train.eval_loss(load_model(tiny_model_dir), val, tok.pad_id, 4, torch.device("cpu"), "fp32")
    assert curve[0] == pytest.approx(start, rel=1e-5)
    # the footsteps, found here from the logged curve: the first step at or below each third of the drop
    l0, lmin = curve[0], min(v for s, v in curve.items() if s)
    assert lmin < l0
    levels = [l0 - (l0 - lmin) / 3, l0 - 2 * (l0 - lmin) / 3, lmin]
    expect = sorted({16} | {min(s for s in curve if s and curve[s] <= lv + 1e-12) for lv in levels})
    kept = [s for s, _ in checkpoints.list_checkpoints(out)]
    assert kept == expect and not list(out.glob(".tmp-*"))
    index = json.loads((out / "checkpoints.json").read_text())
    assert index["steps"] == kept and index["final"] == 16 and index["spacing"] == "val_loss"
    assert index["best"] == min(curve, key=lambda s: (curve[s], s) if s else (math.inf, s))
    for s, p in checkpoints.list_checkpoints(out):
        assert json.loads((p / "meta.json").read_text())["val_loss"] == curve[s]
    assert {int(k): v for k, v in index["val_curve"].items()} == curve


def test_val_loss_spacing_resumes_to_the_same_footsteps(tiny_model_dir, tmp_path, monkeypatch):
    args = ("--epochs", "2", "--spacing", "val_loss", "--checkpoints", "2", "--eval-every", "2", "--dtype", "fp32")
    run_sft(tiny_model_dir, tmp_path / "straight", *args)
    real_update = train.apply_update

    def crash(optimizer, lr, step, loss, grad_norm):
        if step == 5:  # the candidates at 2 and 4 are saved, the one at 6 not yet
            raise RuntimeError("simulated crash")
        real_update(optimizer, lr, step, loss, grad_norm)

    monkeypatch.setattr(sft, "apply_update", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sft(tiny_model_dir, tmp_path / "resumed", *args)
    monkeypatch.setattr(sft, "apply_update", real_update)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "resumed")] == [2, 4]
    run_sft(tiny_model_dir, tmp_path / "resumed", *args, "--resume")
    a, b = (json.loads((tmp_path / r / "checkpoints.json").read_text()) for r in ("straight", "resumed"))
    assert a == b and a["steps"][-1] == 8 and len(a["val_curve"]) == 5  # step 0 (logged once) and 2, 4, 6, 8
    for s in a["steps"]:
        x, y = (load_file(tmp_path / r / checkpoints.checkpoint_name(s) / "model.safetensors")
                for r in ("straight", "resumed"))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_best_by_metric_is_the_highest_validation_metric(tmp_path):
    for step, metric in ((10, 0.2), (20, 0.5), (30, 0.5), (40, 0.1), (50, None)):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "meta.json").write_text(json.dumps({"step": step, "val_metric": metric}))
    assert checkpoints.best_by_metric(tmp_path) == tmp_path / "step_000020"  # the earlier of the two best
    (tmp_path / "none").mkdir()
    assert checkpoints.best_by_metric(tmp_path / "none") is None
