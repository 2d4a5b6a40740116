"""distill.py end to end on tiny random Llamas with the real tokenizer: teacher checkpoints -> SFT student ->
weights.py -> every variant (TD, CD, SCD, AW-only, SCD+AW), the layout it writes, resume, and refused inputs."""

import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TEACHER_STEPS, make_teacher_runs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoints
import data
import distill
import distill_run
import schedule
import weights
from losses import KDTerm
from model import load_model
from runtime import UserError
from teachers import ModelTeacher



@pytest.fixture(scope="module")
def runs(module_tmp, tokenizer_dir):
    return make_teacher_runs(module_tmp("runs"), tokenizer_dir)


def argv(runs, out, *extra):
    """distill.py flags for a tiny run; AW's, SCD's and the evaluation's own flags only where they are used (the
    script refuses a flag its run would ignore)."""
    root, init = runs
    extra = list(map(str, extra))
    sched = extra[extra.index("--schedule") + 1] if "--schedule" in extra else "scd"
    aw = ["--student-sft", str(root / "student"), "--aw-table", str(root / "no_table")] if "--no-aw" not in extra \
        else []
    scd = ["--probe-cache", str(root / "probe_cache"), "--probe-size", "3"] if sched == "scd" else []
    evaluation = ["--eval-size", "2"] if "--eval-split" in extra else ["--eval-split", "none"]
    return ["--teacher", str(root / "teacher"), "--init", str(init), "--out", str(out), *aw, *scd, *evaluation,
            "--train-size", "8", "--val-size", "2", "--batch-size", "4", "--max-len", "96", "--stages", "2",
            "--stage-steps", "2", "--eval-batch-size", "4", "--log-every", "1", "--device", "cpu", "--lr", "1e-3",
            "--dtype", "fp32", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


VARIANTS = {
    "td": ("--schedule", "td", "--no-aw", "--alpha", "0.7"),
    "cd": ("--schedule", "cd", "--no-aw"),
    "scd": ("--schedule", "scd", "--no-aw"),
    "td_aw": ("--schedule", "td", "--aw"),
    # with the final evaluation, and bf16 autocast as the cpu preset has it
    "scd_aw": ("--schedule", "scd", "--aw", "--loss", "jsd", "--temperature", "2", "--dtype", "bf16",
               "--eval-split", "test", "--max-new-tokens", "8"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_runs_and_writes_the_layout(variant, runs, tmp_path):
    out = tmp_path / variant
    distill.main(argv(runs, out, *VARIANTS[variant]))
    for name in ("stage_00", "stage_01", "final"):
        assert (out / name / "model.safetensors").exists() and (out / name / "tokenizer.json").exists()
    assert not (out / ".staging").exists() and [s for s, _ in checkpoints.list_checkpoints(out / "resume")] == [4]
    _, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if variant == "scd_aw":
        assert json.loads((out / "final" / "eval_ncbi_disease_test.json").read_text())["n"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["variant"] == variant + ("_jsd" if "jsd" in VARIANTS[variant] else "")
    assert config["schedule"] == VARIANTS[variant][1]

    chosen = [r["chosen"] for r in read_jsonl(out / "schedule.jsonl")]
    rows = read_jsonl(out / "schedule.jsonl")
    assert [r["stage"] for r in rows] == [0, 1] and [r["step"] for r in rows] == [0, 2]
    if variant.startswith("td"):
        assert chosen == [4, 4]  # the best checkpoint (lowest val loss), both stages
    elif variant == "cd":
        assert chosen == [4, 6]  # 3 checkpoints over 2 stages: the last of each share, in order
    else:
        for r in rows:
            sums = {c["ckpt"]: c["sum"] for c in r["candidates"]}
            assert r["chosen"] == min(sums, key=sums.get)
            m1 = {c["ckpt"]: c["metric1"] for c in r["candidates"]}
            assert m1[4] == pytest.approx(0, abs=1e-6) and all(v > 0 for s, v in m1.items() if s != 4)
        assert rows[0]["candidates"][0]["metric1"] == rows[1]["candidates"][0]["metric1"]

    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["ckpt"] for r in steps] == [chosen[0]] * 2 + [chosen[1]] * 2
    for r in steps:
        assert all(k in r for k in ("ce", "kd", "w", "lr", "tok_per_s", "grad_norm")) and r["kd"] > 0
        if "aw" in variant:
            assert 0 < r["w"] < 1 and r["w"] != pytest.approx(0.5, abs=1e-4)
        else:  # a fixed α: the loss is exactly α·KD + (1 − α)·CE
            alpha = 0.7 if variant == "td" else 0.5
            assert r["w"] == pytest.approx(alpha)
            assert r["loss"] == pytest.approx(alpha * r["kd"] + (1 - alpha) * r["ce"], rel=1e-5)
    # the lr schedule restarts at every stage
    assert steps[0]["lr"] == steps[2]["lr"] and steps[1]["lr"] == steps[3]["lr"]


def test_aw_uses_the_weights_table_and_its_losses(runs, tmp_path):
    root, _ = runs
    weights.main(["--teacher", str(root / "teacher"), "--student-sft", str(root / "student"), "--out",
                  str(tmp_path / "aw"), "--train-size", "8", "--max-len", "96", "--batch-size", "4", "--device", "cpu"])
    ids, cols, _ = weights.load_losses(tmp_path / "aw" / "losses.safetensors")
    assert len(ids) == 8 and sorted(cols) == ["step_000002", "step_000004", "step_000006", "student_sft"]
    analysis = json.loads((tmp_path / "aw" / "sfs_tfs.json").read_text())
    assert sorted(analysis) == ["best (step 4)", "final (step 6)"]
    r = analysis["best (step 4)"]
    assert len(r["sfs_ids"]) + len(r["tfs_ids"]) == 8 and r["sfs_share"] + r["tfs_share"] == pytest.approx(1)

    # the distill run reads L_stuSFT from the table: it writes no table of its own
    out = tmp_path / "run"
    a = argv(runs, out, "--schedule", "td")
    a[a.index("--aw-table") + 1] = str(tmp_path / "aw" / "losses.safetensors")
    distill.main(a)
    assert not (out / "aw_losses.safetensors").exists()
    # and the same values as the run that scored the student itself
    own = tmp_path / "own"
    distill.main(argv(runs, own, "--schedule", "td"))
    own_ids, own_cols, _ = weights.load_losses(own / "aw_losses.safetensors")
    assert own_ids == ids
    torch.testing.assert_close(own_cols["student_sft"], cols["student_sft"])


def test_aw_weights_come_from_the_teacher_logits_of_the_kd_term(runs, tokenizer_dir):
    """w per sample == aw_weight(L_stuSFT, token-mean CE of the chosen teacher), recomputed independently."""
    root, init = runs
    tok = data.load_tokenizer(tokenizer_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=3), 96)
    teacher = load_model(root / "teacher" / "step_000004")
    student = load_model(init)
    l_stu = torch.tensor([2.0, 9.0, 40.0])
    batch = data.collate(items, tok.pad_id)
    args = SimpleNamespace(alpha=0.5, beta=0.5, lam=0.1, loss="fkl", temperature=1.0, dtype="fp32")
    stats = distill.distill_step(student, ModelTeacher(teacher, torch.device("cpu"), "fp32"), lambda ids: l_stu,
                                 KDTerm.of(args), [batch], args.alpha, torch.device("cpu"), "fp32")
    l_ckpt = weights.sample_losses(teacher, items, tok.pad_id, 3, torch.device("cpu"))
    assert stats["w"] == pytest.approx(float((l_stu / (l_stu + l_ckpt)).mean()), rel=1e-5)


def kill_at(monkeypatch, target, name, when):
    """Make target.name raise once `when(*args)` holds, like a kill -9 at that point."""
    real = getattr(target, name)

    def wrapped(*a, **kw):
        if when(*a, **kw):
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(target, name, wrapped)


RESUME_FLAGS = ("--schedule", "scd", "--aw", "--save-every", "1", "--stage-steps", "3")


@pytest.fixture(scope="module")
def straight_run(runs, module_tmp):
    out = module_tmp("straight") / "run"
    distill.main(argv(runs, out, *RESUME_FLAGS))
    return out


@pytest.mark.parametrize("where", ["mid_stage", "stage_switch"])
def test_resume_is_bit_identical(where, runs, straight_run, tmp_path, monkeypatch):
    extra = RESUME_FLAGS
    with monkeypatch.context() as m:
        if where == "mid_stage":  # during the update of global step 4 (stage 1, its 2nd step)
            kill_at(m, distill, "apply_update", lambda opt, lr, step, *a: step == 4)
        else:  # while SCD chooses the teacher of stage 1
            kill_at(m, schedule.Scheduler, "choose", lambda self, stage, *a: stage == 1)
        with pytest.raises(RuntimeError, match="killed"):
            distill.main(argv(runs, tmp_path / "killed", *extra))
    distill.main(argv(runs, tmp_path / "killed", *extra, "--resume"))
    a, b = load_file(straight_run / "final" / "model.safetensors"), \
        load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("schedule.jsonl", "metrics.jsonl"):
        drop = ("tok_per_s",)
        rows = [[{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(d / f)]
                for d in (straight_run, tmp_path / "killed")]
        assert rows[0] == rows[1], f


def test_refuses_mismatched_vocab_or_tokenizer(runs, tmp_path):
    _, init = runs
    bad = tmp_path / "bad_init"
    shutil.copytree(init, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 64}))
    a = argv(runs, tmp_path / "out")
    a[a.index("--init") + 1] = str(bad)
    with pytest.raises(UserError, match="vocab_size"):
        distill.main(a)
    (bad / "config.json").write_text(json.dumps(cfg))
    tk = json.loads((bad / "tokenizer.json").read_text())
    vocab = tk["model"]["vocab"]
    x, y = list(vocab)[100:102]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (bad / "tokenizer.json").write_text(json.dumps(tk))
    with pytest.raises(UserError, match="tokenizer"):
        distill.main(a)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_refuses_teacher_dir_without_checkpoints(runs, tmp_path):
    empty = tmp_path / "teacher"
    (empty / "step_000005").mkdir(parents=True)  # incomplete: no meta.json
    a = argv(runs, tmp_path / "out")
    a[a.index("--teacher") + 1] = str(empty)
    r = subprocess.run([sys.executable, "distill.py", *a], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {empty}: no complete checkpoints (step_XXXXXX/ with meta.json); run sft.py for it first"]


def test_refuses_nonsense_flags(runs, tmp_path):
    for flag, value in (("--stages", "0"), ("--alpha", "1.5"), ("--temperature", "0"), ("--probe-size", "0")):
        a = argv(runs, tmp_path / "out")
        with pytest.raises(UserError, match=flag):
            distill.main([*a, flag, value])


def test_distinct_checkpoints(runs, tmp_path):
    teacher = runs[0] / "teacher"
    n = len(TEACHER_STEPS)
    with pytest.raises(UserError, match=f"--stages {n + 1} with --distinct"):
        distill.main(argv(runs, tmp_path / "a", "--schedule", "scd", "--distinct", "--stages", n + 1))
    with pytest.raises(UserError, match="--stages 2 with --distinct: TD has 1"):
        distill.main(argv(runs, tmp_path / "b", "--schedule", "td", "--distinct"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    distill.main(argv(runs, tmp_path / "c", "--schedule", "scd", "--no-aw", "--distinct", "--stages", n,
                      "--stage-steps", 1))
    chosen = [r["chosen"] for r in read_jsonl(tmp_path / "c" / "schedule.jsonl")]
    assert sorted(chosen) == [s for s, _ in checkpoints.list_checkpoints(teacher)]


@pytest.mark.parametrize("when", ["step:4", "time:1.5"])
def test_kill_9_then_resume_is_bit_identical(when, runs, straight_run, tmp_path):
    """A real SIGKILL of the distill.py process, by logged step or by time after its first step."""
    import os
    import signal
    import time
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "distill.py"), *argv(runs, out, *RESUME_FLAGS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kind, _, arg = when.partition(":")
    steps = lambda: len([s for s in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in s]) \
        if (out / "metrics.jsonl").exists() else 0  # noqa: E731
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 120:
        if steps() >= (int(arg) if kind == "step" else 1):
            time.sleep(0 if kind == "step" else float(arg))
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    resume = ["--resume"] if checkpoints.latest_resumable(out / "resume") else ["--overwrite"]
    r = subprocess.run([*cmd, *resume], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(straight_run / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_any_result_changing_flag_or_input(runs, tmp_path):
    """--resume names the first flag or input content that differs from the run's config.json and leaves the run
    untouched; a flag that does not change results (--log-every, --save-every) may differ."""
    root, init = runs
    out = tmp_path / "run"
    base = ("--schedule", "scd", "--no-aw", "--stage-steps", "1")
    distill.main(argv(runs, out, *base))
    saved = (out / "config.json").read_bytes()
    other_teacher = tmp_path / "teacher_copy"
    shutil.copytree(root / "teacher", other_teacher)
    changes = {"stage_steps": ("--stage-steps", "2"), "loss": ("--loss", "rkl"), "temperature": ("--temperature", "2"),
               "alpha": ("--alpha", "0.3"), "lr": ("--lr", "2e-3"), "probe_size": ("--probe-size", "2"),
               "aw": ("--aw",), "schedule": ("--schedule", "cd"), "stages": ("--stages", "3"),
               "seed": ("--seed", "1"), "dtype": ("--dtype", "bf16"), "max_len": ("--max-len", "80")}
    for key, flag in changes.items():
        b = list(base)  # argv() gives AW and SCD their own flags from the base: switch them there
        if key == "aw":
            b.remove("--no-aw")
        elif key == "schedule":
            b[b.index("scd")], flag = "cd", ()
        with pytest.raises(UserError, match=f"config.json has {key}=.* but this run has {key}="):
            distill.main(argv(runs, out, *b, "--resume", *flag))
        assert (out / "config.json").read_bytes() == saved, key
    for flag, key in (("--teacher", "teacher"), ("--init", "init")):
        a = argv(runs, out, *base, "--resume")
        a[a.index(flag) + 1] = str(other_teacher if flag == "--teacher" else root / "s")
        with pytest.raises(UserError, match=f"has {key}="):
            distill.main(a)
    # the same path, retrained in place: the content fingerprint differs, and the message names the checkpoint
    a = argv(runs, out, *base, "--resume")
    a[a.index("--teacher") + 1] = str(other_teacher)
    shutil.copy2(other_teacher / "step_000002" / "model.safetensors", other_teacher / "step_000004")
    config = json.loads(saved)
    config["teacher"] = str(other_teacher)  # as if the run had been started on this dir
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json has inputs.teacher.4="):
        distill.main(a)
    (out / "config.json").write_bytes(saved)
    distill.main(argv(runs, out, *base, "--resume", "--log-every", "3", "--save-every", "1"))
    assert (out / "config.json").read_bytes() == saved


def aw_table(path, items, tok, student_dir, **change):
    """An L_stuSFT table as weights.py writes it, scored here from the student's own forward."""
    key = {**weights.table_key("ncbi_disease", 96, "fp32", "cpu", tok.files, student_dir), **change}
    losses = weights.sample_losses(load_model(student_dir), items, tok.pad_id, 4, torch.device("cpu"))
    weights.save_losses(path, [it["id"] for it in items], {weights.STUDENT: losses},
                        {**key, "item_digests": [checkpoints.item_digest(it) for it in items]})
    return key, losses


def test_aw_table_is_used_only_when_made_for_this_run(runs, tmp_path, tokenizer_dir):
    """A table is matched on task, max length, dtype, device kind, tokenizer, the SFT student's weights and every
    example's tokens; any difference is named and the values are not used."""
    root, init = runs
    tok = data.load_tokenizer(tokenizer_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=4), 96)
    student = root / "student" / "step_000003"
    table = tmp_path / "t.safetensors"
    key, losses = aw_table(table, items, tok, student)
    got, why = weights.student_losses_for(items[::-1], [table], key)
    assert why == [] and torch.equal(got, losses.flip(0))  # by id, in the items' order

    def refused(items=items, **change):
        got, why = weights.student_losses_for(items, [table], {**key, **change})
        assert got is None and len(why) == 1
        return why[0]

    assert "its dtype is 'fp32', this run's is 'bf16'" in refused(dtype="bf16")
    assert "device" in refused(device="cuda")
    assert "max_len" in refused(max_len=80)
    assert "task" in refused(task="bc5cdr")
    assert "tokenizer" in refused(tokenizer="0" * 64)
    # the SFT student retrained in the same dir: same path, other weights
    retrained = tmp_path / "student"
    shutil.copytree(student, retrained)
    aw_table(table, items, tok, retrained)
    shutil.copy2(init / "model.safetensors", retrained / "model.safetensors")
    moved = weights.table_key("ncbi_disease", 96, "fp32", "cpu", tok.files, retrained)
    got, why = weights.student_losses_for(items, [table], moved)
    assert got is None and "student_sft_fingerprint" in why[0]
    aw_table(table, items, tok, student)
    # an edited example under its old id (a JSONL line keeps its file:line id), and one the table never saw
    edited = [dict(it) for it in items]
    edited[1]["input_ids"] = edited[1]["input_ids"][:-2] + [edited[1]["input_ids"][-1]] * 2
    assert "was scored from other tokens" in refused(items=edited)
    assert "has no example" in refused(items=items + [{**items[0], "id": "new"}])


def test_distill_rescores_when_the_table_is_stale(runs, tmp_path):
    """weights.py's table for an SFT student that was then retrained in place: distill.py scores it again."""
    root, init = runs
    student_run = tmp_path / "student"
    shutil.copytree(root / "student", student_run)
    weights.main(["--teacher", str(root / "teacher"), "--student-sft", str(student_run), "--out", str(tmp_path / "aw"),
                  "--train-size", "8", "--max-len", "96", "--batch-size", "4", "--device", "cpu", "--steps", "best"])
    shutil.copy2(init / "model.safetensors", student_run / "step_000003" / "model.safetensors")
    a = argv(runs, tmp_path / "run", "--schedule", "td", "--stages", "1", "--stage-steps", "1")
    a[a.index("--aw-table") + 1] = str(tmp_path / "aw" / "losses.safetensors")
    a[a.index("--student-sft") + 1] = str(student_run)
    distill.main(a)
    ids, cols, _ = weights.load_losses(tmp_path / "run" / "aw_losses.safetensors")
    old_ids, old, _ = weights.load_losses(tmp_path / "aw" / "losses.safetensors")
    assert ids == old_ids and not torch.allclose(cols[weights.STUDENT], old[weights.STUDENT])


# -----------------------------------------------------------------------------
# beyond the paper (issue #16): candidate subsets, metric balance, forward-only, dynamic AW, SFS/TFS per stage


def hf_sample_losses(model_dir, items):
    """Token-mean answer CE per item, from transformers' logits in float64, one item at a time (no padding)."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    for it in items:
        with torch.no_grad():
            logits = hf(torch.tensor([it["input_ids"]])).logits[0, :-1].double()
        target = torch.tensor(it["labels"][1:])
        sel = target != -100
        out.append(float(-torch.log_softmax(logits[sel], -1).gather(1, target[sel, None]).mean()))
    return torch.tensor(out, dtype=torch.float64)


def train_items(tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=8, seed=0), 96)
    return items


def test_beyond_flags_refused_where_they_would_be_ignored(runs, tmp_path):
    root, _ = runs
    cases = [(("--schedule", "td", "--candidates", "2"), "--candidates: chooses the checkpoints"),
             (("--candidate-spacing", "geometric"), "--candidate-spacing: places --candidates"),
             (("--schedule", "cd", "--forward-only"), "--forward-only: changes how SCD chooses"),
             (("--schedule", "cd", "--metric-balance", "spread"), "--metric-balance: changes how SCD chooses"),
             (("--metric2-weight", "2"), "--metric2-weight: is the w of --metric-balance weight"),
             (("--no-aw", "--aw-anchor", "current"), "--aw-anchor: chooses AW's reference"),
             (("--aw-anchor", "current"), "--aw-table: is AW's frozen SFT reference"),
             (("--candidates", "4"), "--candidates 4: the teacher run has 3"),
             (("--metric-balance", "weight", "--metric2-weight", "-1"), "--metric2-weight -1.0: out of range")]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            distill.main(argv(runs, tmp_path / "out", *extra))
    a = argv(runs, tmp_path / "out", "--sides", str(tmp_path / "none.json"))
    with pytest.raises(UserError, match="--sides .*none.json: not found"):
        distill.main(a)
    assert not (tmp_path / "out").exists()


def test_default_flags_change_nothing(runs, straight_run, tmp_path):
    """The new flags at values that mean the paper (all checkpoints as candidates, Metric 2 weight 1) give the
    paper's run bit for bit: the same schedule and the same weights."""
    out = tmp_path / "same"
    distill.main(argv(runs, out, *RESUME_FLAGS, "--candidates", len(TEACHER_STEPS), "--metric-balance", "weight",
                      "--metric2-weight", "1"))
    a, b = load_file(straight_run / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight = read_jsonl(straight_run / "schedule.jsonl")
    rows = read_jsonl(out / "schedule.jsonl")
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in straight]
    assert [[{k: c[k] for k in ("ckpt", "metric1", "metric2", "sum")} for c in r["candidates"]] for r in rows] == \
        [r["candidates"] for r in straight]
    assert all(set(r) == {"stage", "step", "schedule", "chosen", "candidates"} for r in straight)
    assert not (straight_run / "aw_anchor").exists()


def test_candidates_are_a_subset_of_the_same_teacher_run(runs, tmp_path):
    """--candidates 2 of checkpoints 2, 4, 6 (best 4): even targets 3 and 6 -> 2 (the earlier on the tie) and 6."""
    distill.main(argv(runs, tmp_path / "cd", "--schedule", "cd", "--no-aw", "--candidates", "2"))
    assert [r["chosen"] for r in read_jsonl(tmp_path / "cd" / "schedule.jsonl")] == [2, 6]
    distill.main(argv(runs, tmp_path / "scd", "--no-aw", "--candidates", "2", "--stage-steps", "1"))
    full = tmp_path / "full"
    distill.main(argv(runs, full, "--no-aw", "--stage-steps", "1"))
    for r, f in zip(read_jsonl(tmp_path / "scd" / "schedule.jsonl"), read_jsonl(full / "schedule.jsonl")):
        assert [c["ckpt"] for c in r["candidates"]] == [2, 6] and r["chosen"] in (2, 6)
        # Metric 1 still measures from the run's best checkpoint (4), which is no candidate
        m1 = {c["ckpt"]: c["metric1"] for c in f["candidates"]}
        assert [c["metric1"] for c in r["candidates"]] == [m1[2], m1[6]] and min(m1[2], m1[6]) > 0
        break  # stage 0: the same student in both runs
    config = json.loads((tmp_path / "scd" / "config.json").read_text())
    assert sorted(config["inputs"]["teacher"]) == ["2", "4", "6"]


def test_balance_and_forward_only_reach_the_schedule(runs, tmp_path):
    out = tmp_path / "fwd"
    distill.main(argv(runs, out, "--no-aw", "--metric-balance", "spread", "--forward-only", "--stages", "3",
                      "--stage-steps", "1"))
    rows = read_jsonl(out / "schedule.jsonl")
    chosen = [r["chosen"] for r in rows]
    assert chosen == sorted(chosen)
    for prev, r in zip([None, *chosen], rows):
        assert r["metric_balance"] == "spread" and r["forward_only"] is True
        terms = {c["ckpt"]: c["score_terms"] for c in r["candidates"]}
        allowed = [s for s in terms if prev is None or s >= prev]
        assert [s for s in terms if terms[s] is not None] == allowed
        assert r["chosen"] == min(allowed, key=lambda s: (sum(terms[s]), s))
        m1 = {c["ckpt"]: c["metric1"] for c in r["candidates"] if c["ckpt"] in allowed}
        m2 = {c["ckpt"]: c["metric2"] for c in r["candidates"] if c["ckpt"] in allowed}
        spread1 = max(m1.values()) - min(m1.values())
        spread2 = max(m2.values()) - min(m2.values())
        assert r["spread1"] == pytest.approx(spread1) and r["spread2"] == pytest.approx(spread2)
        for s in allowed:
            assert terms[s] == pytest.approx([m1[s] / (spread1 or 1), m2[s] / (spread2 or 1)])


DYNAMIC = ("--schedule", "cd", "--aw-anchor", "current", "--save-every", "1", "--stage-steps", "3")


def dynamic_argv(runs, out, *extra):
    a = argv(runs, out, *DYNAMIC, *extra)
    for flag in ("--student-sft", "--aw-table"):  # the frozen reference is not used: refused if given
        i = a.index(flag)
        del a[i:i + 2]
    return a


@pytest.fixture(scope="module")
def dynamic_run(runs, module_tmp):
    out = module_tmp("dynamic") / "run"
    seen = []
    real = distill.distill_step

    def spy(student, teacher, anchor, kd_term, micro, *rest):
        seen.append({i: float(v) for b in micro for i, v in zip(b["ids"], anchor(b["ids"]))})
        return real(student, teacher, anchor, kd_term, micro, *rest)

    distill.distill_step = spy
    try:
        distill.main(dynamic_argv(runs, out))
    finally:
        distill.distill_step = real
    return out, seen


def test_dynamic_aw_anchor_is_the_students_own_loss_at_each_stage_start(runs, dynamic_run, tokenizer_dir):
    """Stage 0's anchor is the initial student's per-sample loss, stage 1's the loss of the student that stage 0
    left (its stage_00 export), both recomputed here by transformers in float64; AW read exactly those values."""
    root, init = runs
    out, seen = dynamic_run
    items = train_items(tokenizer_dir)
    ids = [it["id"] for it in items]
    for stage, model_dir in ((0, init), (1, out / "stage_00")):
        file_ids, cols, _ = weights.load_losses(out / "aw_anchor" / f"stage_{stage:02d}.safetensors")
        assert file_ids == ids
        torch.testing.assert_close(cols["anchor"].double(), hf_sample_losses(model_dir, items), rtol=1e-4, atol=1e-5)
        by_id = dict(zip(ids, cols["anchor"].tolist()))
        for step_anchor in seen[3 * stage:3 * stage + 3]:  # the 3 steps of this stage
            assert step_anchor == {i: by_id[i] for i in step_anchor}
    a0, a1 = (weights.load_losses(out / "aw_anchor" / f"stage_{s:02d}.safetensors")[1]["anchor"] for s in (0, 1))
    assert not torch.equal(a0, a1)  # the student moved, so the anchor did
    assert not (out / "aw_losses.safetensors").exists()  # no frozen SFT student was scored
    assert json.loads((out / "config.json").read_text())["aw_anchor"] == "current"


@pytest.mark.parametrize("where", ["mid_stage", "stage_switch"])
def test_dynamic_aw_resume_is_bit_identical(where, runs, dynamic_run, tmp_path, monkeypatch):
    straight, _ = dynamic_run
    with monkeypatch.context() as m:
        if where == "mid_stage":
            kill_at(m, distill, "apply_update", lambda opt, lr, step, *a: step == 4)
        else:
            kill_at(m, schedule.Scheduler, "choose", lambda self, stage, *a: stage == 1)
        with pytest.raises(RuntimeError, match="killed"):
            distill.main(dynamic_argv(runs, tmp_path / "killed"))
    distill.main(dynamic_argv(runs, tmp_path / "killed", "--resume"))
    a, b = load_file(straight / "final" / "model.safetensors"), \
        load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("schedule.jsonl", "metrics.jsonl"):
        rows = [[{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_jsonl(d / f)]
                for d in (straight, tmp_path / "killed")]
        assert rows[0] == rows[1], f


def test_sides_are_logged_after_every_stage(runs, tmp_path, tokenizer_dir):
    root, _ = runs
    weights.main(["--teacher", str(root / "teacher"), "--student-sft", str(root / "student"), "--out",
                  str(tmp_path / "aw"), "--train-size", "8", "--max-len", "96", "--batch-size", "4", "--device", "cpu"])
    split = json.loads((tmp_path / "aw" / "sfs_tfs.json").read_text())["final (step 6)"]
    assert split["sfs_ids"] and split["tfs_ids"]  # both sides hold examples, so both means are tested
    out = tmp_path / "run"
    distill.main(argv(runs, out, "--schedule", "td", "--no-aw", "--sides", str(tmp_path / "aw" / "sfs_tfs.json")))
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("eval")]
    assert [r["stage"] for r in evals] == [0, 1]
    items = {it["id"]: it for it in train_items(tokenizer_dir)}
    for r in evals:
        for side in ("sfs", "tfs"):
            expect = hf_sample_losses(out / f"stage_{r['stage']:02d}", [items[i] for i in split[f"{side}_ids"]])
            assert r[f"{side}_loss"] == pytest.approx(float(expect.mean()), rel=1e-4)
    # a split made from other examples is refused by name
    bad = {"final (step 6)": {**split, "sfs_ids": [*split["sfs_ids"], "no-such-id"]}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="example 'no-such-id' is not in this run's training examples"):
        distill.main(argv(runs, tmp_path / "x", "--schedule", "td", "--no-aw", "--sides", str(tmp_path / "bad.json")))


def test_stage_epochs_and_the_best_stage_by_the_validation_metric(runs, tmp_path, monkeypatch):
    """--stage-epochs E: every stage is E passes over the training examples. --val-metric: each stage's student is
    scored on the validation split by the task metric, the best stage is kept as best/ and scored on the evaluation
    split beside final/, and a resume at a stage boundary remembers which stage was best."""
    real = distill_run.evaluate.evaluate
    scores = iter([0.1, 0.3])  # the validation metric of stages 0 and 1; stage 2's comes after the resume

    def fake(model, tok, task, examples, *a, **kw):
        if "/val/" not in examples[0].id:  # the test evaluations are real
            return real(model, tok, task, examples, *a, **kw)
        return {"main": next(scores)}, []

    a = argv(runs, tmp_path / "run", "--schedule", "td", "--no-aw", "--val-metric", "--stage-epochs", "1.5",
             "--stages", "3", "--eval-split", "test", "--max-new-tokens", "4", "--eval-max-new-tokens", "4")
    i = a.index("--stage-steps")
    del a[i:i + 2]
    monkeypatch.setattr(distill_run.evaluate, "evaluate", fake)
    with monkeypatch.context() as m:
        kill_at(m, schedule.Scheduler, "choose", lambda self, stage, *x: stage == 2)
        with pytest.raises(RuntimeError, match="killed"):
            distill.main(a)
    scores = iter([0.2])
    distill.main(a + ["--resume"])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert max(r["step"] for r in rows) == 3 * 3  # 8 examples in batches of 4: 2 steps an epoch, 1.5 epochs a stage
    assert [r["val_metric"] for r in rows if r.get("eval")] == [0.1, 0.3, 0.2]
    best = load_file(tmp_path / "run" / "best" / "model.safetensors")
    stage1 = load_file(tmp_path / "run" / "stage_01" / "model.safetensors")
    assert all(torch.equal(best[k], stage1[k]) for k in best)
    assert json.loads((tmp_path / "run" / "best" / "meta.json").read_text())["stage"] == 1
    finals = {r["checkpoint"]: r for r in rows if r.get("final_eval")}
    assert set(finals) == {"final", "best"} and all(r["n"] == 2 for r in finals.values())
    assert (tmp_path / "run" / "best" / "eval_ncbi_disease_test.json").exists()
    with pytest.raises(UserError, match="--stage-steps: --stage-epochs sets"):
        distill.main(a + ["--stage-steps", "2"])


def test_taid_runs_logs_t_and_resumes_exactly(runs, tmp_path, monkeypatch):
    """--loss taid: t starts at --taid-t-start, never falls, is logged per step, and a resume restores it (so the
    resumed run is the straight one, bit for bit)."""
    flags = ("--schedule", "td", "--no-aw", "--alpha", "1", "--loss", "taid", "--save-every", "1", "--stage-steps", "3")
    distill.main(argv(runs, tmp_path / "straight", *flags))
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    ts = [r["taid_t"] for r in rows]
    assert ts[0] == 0.4 and ts == sorted(ts) and ts[-1] > 0.4 and all(r["kd"] > 0 for r in rows)
    with monkeypatch.context() as m:
        kill_at(m, distill, "apply_update", lambda opt, lr, step, *a: step == 4)
        with pytest.raises(RuntimeError, match="killed"):
            distill.main(argv(runs, tmp_path / "killed", *flags))
    distill.main(argv(runs, tmp_path / "killed", *flags, "--resume"))
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "straight", tmp_path / "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda r: {k: v for k, v in r.items() if k != "tok_per_s"}  # noqa: E731
    assert [drop(r) for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")] == \
        [drop(r) for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    with pytest.raises(UserError, match="--taid-alpha"):
        distill.main(argv(runs, tmp_path / "x", "--schedule", "td", "--no-aw", "--taid-alpha", "0.1"))


GKD = ("--schedule", "td", "--no-aw", "--alpha", "1", "--loss", "jsd")


def test_on_policy_rate_0_is_off_policy_jsd_and_rate_1_trains_on_samples(runs, tmp_path, monkeypatch):
    distill.main(argv(runs, tmp_path / "off", *GKD))
    distill.main(argv(runs, tmp_path / "zero", *GKD, "--on-policy", "0"))
    drop = lambda r: {k: v for k, v in r.items() if k != "tok_per_s"}  # noqa: E731
    assert [drop(r) for r in read_jsonl(tmp_path / "zero" / "metrics.jsonl")] == \
        [drop(r) for r in read_jsonl(tmp_path / "off" / "metrics.jsonl")]
    seen = []
    real = distill.distill_step

    def spy(student, teacher, anchor, kd_term, micro, *rest):
        seen.append(micro)
        return real(student, teacher, anchor, kd_term, micro, *rest)

    monkeypatch.setattr(distill, "distill_step", spy)
    distill.main(argv(runs, tmp_path / "on", *GKD, "--on-policy", "1", "--max-new-tokens", "6"))
    for micro in seen:  # every step trained on sampled answers after the gold prompts
        for b in micro:
            for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
                first = next(j for j, y in enumerate(labels) if y != -100)
                answer = [y for y in labels[first:] if y != -100]
                assert 1 <= len(answer) <= 7 and ids[first:first + len(answer)] == answer
    rows = [r for r in read_jsonl(tmp_path / "on" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] != [r for r in read_jsonl(tmp_path / "off" / "metrics.jsonl") if "loss" in r][0]["loss"]
    for extra, msg in ((("--teacher-cache", tmp_path / "none"), "live teacher"), (("--aw",), "no gold")):
        a = argv(runs, tmp_path / "bad", *GKD, "--on-policy", "0.5", *extra)
        if "--aw" in extra:
            a = argv(runs, tmp_path / "bad", "--schedule", "td", "--aw", "--loss", "jsd", "--on-policy", "0.5")
        with pytest.raises(UserError, match=msg):
            distill.main(a)


def test_on_policy_samples_come_from_the_students_own_distribution(tokenizer_dir, tmp_path):
    """The first sampled answer token over many draws: its frequencies are the student's softmax at that position
    (a model made peaked, so a few tokens carry the mass and the check has power)."""
    from conftest import make_tiny_model
    from on_policy import OnPolicy

    tok = data.load_tokenizer(tokenizer_dir)
    student = load_model(make_tiny_model(tmp_path / "s", tokenizer_dir, n_layers=1, dim=16, seed=3))
    with torch.no_grad():
        student.lm_head.weight.mul_(40.0)
    items, _ = data.encode_split(tok, data.load_examples("ncbi_disease", "train", limit=1), 96)
    batch = data.collate(items, tok.pad_id)
    first = next(j for j, y in enumerate(batch["labels"][0].tolist()) if y != -100)
    with torch.no_grad():
        p = torch.softmax(student(batch["input_ids"][:, :first])[0, -1], -1)
    sampler = OnPolicy(1.0, tok, 1, seed=0, device=torch.device("cpu"))
    n = 600
    draws = [sampler(batch_list, student, step)[0]["labels"][0, first].item()
             for step, batch_list in enumerate([[batch]] * n)]
    top = p.topk(3)
    # peaked enough that greedy decoding (frequency 1) or a flat draw (frequency ~0) would fail the check below
    assert 0.1 < top.values[0] < 0.5
    for prob, token in zip(top.values.tolist(), top.indices.tolist()):
        freq = draws.count(token) / n
        assert abs(freq - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-3, (token, freq, prob)


def test_a_jsonl_run_says_when_it_has_no_final_evaluation(runs, tmp_path, capsys):
    """--data train,val with --eval-split test: one warning line at the start and config.json's final_eval say
    there is none. With a test file that has no header of its own, the final evaluation scores it by the training
    file's label set (choices, no generation)."""
    yesno = [ROOT / "examples" / f"yesno.{split}.jsonl" for split in ("train", "val", "test")]
    test = tmp_path / "yesno.test.jsonl"
    test.write_text("".join(yesno[2].read_text().splitlines(keepends=True)[1:]))
    flags = ("--schedule", "td", "--no-aw", "--task", "jsonl", "--eval-split", "test")
    data_flag = f"{yesno[0]},{yesno[1]}"
    distill.main(argv(runs, tmp_path / "none", *flags, "--data", data_flag))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: no final")]
    assert warnings == [f"warning: no final evaluation on --eval-split test: --data {data_flag} names no test file "
                        "(train,val,test)"]
    config = json.loads((tmp_path / "none" / "config.json").read_text())
    assert config["final_eval"] == {"split": None, "why": warnings[0].split(": ", 2)[2]}
    assert not list((tmp_path / "none" / "final").glob("eval_*"))
    assert not [r for r in read_jsonl(tmp_path / "none" / "metrics.jsonl") if r.get("final_eval")]

    distill.main(argv(runs, tmp_path / "test", *flags, "--data", f"{data_flag},{test}"))
    assert "warning: no final" not in capsys.readouterr().err
    config = json.loads((tmp_path / "test" / "config.json").read_text())
    assert config["final_eval"] == {"split": "test", "file": str(test)}
    metrics = json.loads((tmp_path / "test" / "final" / "eval_jsonl_test.json").read_text())
    assert metrics["n"] == 2 and "accuracy" in metrics
