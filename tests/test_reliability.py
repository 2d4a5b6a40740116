"""Crash safety and bad input (issue: reliability): kill -9 anywhere then --resume gives the same weights,
checkpoints are atomic, runs are deterministic, and every user mistake is one clear line with exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--role", "teacher", "--train-size", "24", "--val-size", "4", "--batch-size", "4", "--max-len", "128",
         "--lr", "3e-3", "--log-every", "1", "--eval-batch-size", "4", "--epochs", "2", "--save-every", "4",
         "--dtype", "fp32", "--eval-max-new-tokens", "8"]


def sft_cmd(model_dir, out, *extra):
    return [sys.executable, str(ROOT / "sft.py"), "--model", str(model_dir), "--out", str(out), *FLAGS, *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)


def one_line_error(r, *needles):
    """Exit 2, no traceback, and one `error: ...` line of its own (a progress bar may precede it on stderr)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert "Traceback" not in r.stderr and len(errors) == 1 and errors[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in errors[0], r.stderr


def final_weights(out):
    steps = checkpoints.list_checkpoints(out)
    return load_file(steps[-1][1] / "model.safetensors"), steps[-1][0]


@pytest.fixture(scope="module")
def tiny(module_tmp, tokenizer_dir):
    from conftest import make_tiny_model
    return make_tiny_model(module_tmp("m") / "tiny", tokenizer_dir)


@pytest.fixture(scope="module")
def straight(tiny, module_tmp):
    out = module_tmp("straight") / "run"
    r = run(sft_cmd(tiny, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def kill_when(proc, condition, delay=0.0, timeout=120):
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if condition():
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def logged_steps(out):
    f = out / "metrics.jsonl"
    return len([s for s in f.read_text().splitlines() if '"loss"' in s]) if f.exists() else 0


@pytest.mark.parametrize("when", ["step:3", "step:9", "time:1.0", "during-save"])
def test_kill_9_then_resume_is_bit_identical(when, tiny, straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(sft_cmd(tiny, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kind, _, arg = when.partition(":")
    if kind == "step":  # killed once the run has logged this many steps
        kill_when(proc, lambda: logged_steps(out) >= int(arg))
    elif kind == "time":  # killed this long after its first step, wherever it is
        kill_when(proc, lambda: logged_steps(out) >= 1, delay=float(arg))
    else:  # killed while a checkpoint's temp dir exists, i.e. in the middle of writing it
        kill_when(proc, lambda: out.exists() and any(p.name.startswith(".tmp-step_") for p in out.iterdir()))
    # whatever it left, every listed checkpoint is whole and loads
    for _, p in checkpoints.list_checkpoints(out):
        assert (p / "model.safetensors").exists() and json.loads((p / "meta.json").read_text())["step"] > 0
    if not checkpoints.list_checkpoints(out):  # killed before its first checkpoint: resume has nothing; start again
        r = run(sft_cmd(tiny, out, "--resume"))
        one_line_error(r, "--resume")
        r = run(sft_cmd(tiny, out, "--overwrite"))
    else:
        r = run(sft_cmd(tiny, out, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    (a, sa), (b, sb) = final_weights(straight), final_weights(out)
    assert sa == sb and all(torch.equal(a[k], b[k]) for k in a)
    def losses(o):
        return [json.loads(s)["loss"] for s in (o / "metrics.jsonl").read_text().splitlines() if '"loss"' in s]
    assert losses(out) == losses(straight)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_two_runs_same_seed_identical_metrics(tiny, straight, tmp_path):
    r = run(sft_cmd(tiny, tmp_path / "again"))
    assert r.returncode == 0
    def strip(o):  # everything but the wall-clock rate
        return [{k: v for k, v in json.loads(s).items() if k != "tok_per_s"}
                for s in (o / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "again") == strip(straight)


def test_non_finite_loss_stops_without_a_checkpoint(tiny, tmp_path):
    from model import load_model, save_model
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    m = load_model(bad)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    save_model(m, bad)
    r = run(sft_cmd(bad, tmp_path / "out"))
    one_line_error(r, "step 1: non-finite loss")
    assert not checkpoints.list_checkpoints(tmp_path / "out")


def write(path: Path, content: bytes | str):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


JSONL_CASES = {
    "malformed": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', "bad.jsonl:2: malformed JSON"),
    "missing field": (b'{"prompt": "a"}\n', "bad.jsonl:1"),
    "empty answer": (b'{"prompt": "a", "response": ""}\n', "bad.jsonl:1"),
    "non-utf8": (b'{"prompt": "caf\xe9", "response": "b"}\n', "UTF-8"),
    "empty dataset": (b"", "empty"),
}


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_bad_jsonl_through_the_cli(case, tiny, tmp_path):
    content, needle = JSONL_CASES[case]
    f = write(tmp_path / "bad.jsonl", content)
    r = run(sft_cmd(tiny, tmp_path / "out", "--task", "jsonl", "--data", str(f)))
    one_line_error(r, "bad.jsonl", needle)
    assert not (tmp_path / "out").exists()  # nothing was created for a run that could not start


def test_long_example_refused_or_truncated(tiny, tmp_path):
    r = run(sft_cmd(tiny, tmp_path / "a", "--max-len", "40", "--refuse-long", "--max-steps", "1"))
    one_line_error(r, "longer than --max-len 40")
    r = run(sft_cmd(tiny, tmp_path / "b", "--max-len", "40", "--max-steps", "1"))
    assert r.returncode == 0 and "truncated to --max-len 40" in r.stdout


def test_bad_model_dirs_through_the_cli(tiny, tmp_path):
    import shutil
    one_line_error(run(sft_cmd(tmp_path / "none", tmp_path / "o")), "not found")
    cfgless = tmp_path / "cfgless"
    shutil.copytree(tiny, cfgless)
    (cfgless / "config.json").unlink()
    one_line_error(run(sft_cmd(cfgless, tmp_path / "o")), "config.json: file not found")
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    one_line_error(run(sft_cmd(trunc, tmp_path / "o")), "model.safetensors: not a valid safetensors file")
    arch = tmp_path / "arch"
    shutil.copytree(tiny, arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (arch / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(sft_cmd(arch, tmp_path / "o")), "only Llama")


def test_out_dir_problems(tiny, straight, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in straight.rglob("*")}
    one_line_error(run(sft_cmd(tiny, straight)), "already holds a run")
    assert {p.name: p.stat().st_mtime_ns for p in straight.rglob("*")} == before  # untouched
    blocker = write(tmp_path / "file", "x")
    one_line_error(run(sft_cmd(tiny, blocker / "sub")), "--out")
    one_line_error(run(sft_cmd(tiny, tmp_path / "fresh", "--resume")), "holds no run to resume")


@pytest.mark.parametrize("flags,needle", [
    (["--max-steps", "-1"], "--max-steps must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--warmup", "1.5"], "--warmup"),
    (["--task", "nosuchtask"], "nosuchtask"),
    (["--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_nonsensical_flags(flags, needle, tiny, tmp_path):
    one_line_error(run(sft_cmd(tiny, tmp_path / "o", *flags)), needle)


# -----------------------------------------------------------------------------
# nothing silently ignored: a flag the run would not use is refused, with what to write instead

IGNORED_FLAGS = {  # script, argv, the start of the error
    "sft --data, built-in task": ("sft", ["--role", "student", "--data", "my.jsonl"],
                                  "--data my.jsonl: task ncbi_disease reads its own files from --data-dir (default "
                                  "../shared/data); to use your file write --task jsonl --data my.jsonl"),
    "sft --data-dir, jsonl": ("sft", ["--task", "jsonl", "--data", "my.jsonl", "--data-dir", "d"],
                              "--data-dir d: --task jsonl reads only the files of --data; drop --data-dir"),
    "sft --metric, built-in task": ("sft", ["--task", "pubmedqa", "--metric", "choices"],
                                    "--metric choices: task pubmedqa is scored by its own metric"),
    "weights --data": ("weights", ["--data", "my.jsonl"], "--data my.jsonl: task ncbi_disease reads its own files"),
    "schedule --data-dir, jsonl": ("schedule", ["--task", "jsonl", "--data", "a.jsonl", "--data-dir", "d"],
                                   "--data-dir d: --task jsonl reads only"),
    "evaluate --data": ("evaluate", ["--model", "m", "--data", "my.jsonl"], "--data my.jsonl: task ncbi_disease"),
    "evaluate --metric": ("evaluate", ["--model", "m", "--task", "bc5cdr", "--metric", "exact"],
                          "--metric exact: task bc5cdr"),
    "evaluate --split, one jsonl file": ("evaluate", ["--model", "m", "--task", "jsonl", "--data", "a.jsonl",
                                                  "--split", "val"],
                                         "--split val: --data a.jsonl is one file, scored whatever the split"),
    "evaluate --split, no such file": ("evaluate", ["--model", "m", "--task", "jsonl", "--data", "a.jsonl,b.jsonl"],
                                       "--split test: --data a.jsonl,b.jsonl has no test file"),
    "distill --data": ("distill", ["--data", "my.jsonl"], "--data my.jsonl: task ncbi_disease"),
    "distill --alpha with AW": ("distill", ["--alpha", "0.7"], "--alpha: AW sets each sample's weight"),
    "distill --aw-table without AW": ("distill", ["--no-aw", "--aw-table", "t"], "--aw-table: is AW's reference"),
    "distill --student-sft without AW": ("distill", ["--no-aw", "--student-sft", "s"], "--student-sft: is AW's"),
    "distill --td-ckpt with SCD": ("distill", ["--td-ckpt", "final"], "--td-ckpt: is the one teacher of --schedule td"),
    "distill --probe-size with CD": ("distill", ["--schedule", "cd", "--probe-size", "4"],
                                     "--probe-size: is SCD's probe; --schedule cd"),
    "distill --probe-cache with TD": ("distill", ["--schedule", "td", "--probe-cache", "c"], "--probe-cache: is SCD's"),
    "distill --beta with fkl": ("distill", ["--beta", "0.2"], "--beta: is the β of --loss jsd; --loss fkl"),
    "distill --lam with jsd": ("distill", ["--loss", "jsd", "--lam", "0.2"], "--lam: is the λ of --loss skew_fkl"),
    "distill --epochs with --stage-steps": ("distill", ["--stage-steps", "3", "--epochs", "1"],
                                            "--epochs: --stage-steps sets the length of every stage"),
    "distill --eval-size without evaluation": ("distill", ["--eval-split", "none", "--eval-size", "4"],
                                               "--eval-size: there is no final evaluation"),
    "experiment --data, built-in task": ("experiment", ["--data", "my.jsonl"], "--data my.jsonl: task ncbi_disease"),
    "experiment --preset with --quick": ("experiment", ["--quick", "--preset", "gpu"],
                                         "--preset gpu: --quick sets every size itself"),
    "experiment jsonl, two files": ("experiment", ["--task", "jsonl", "--data", "a.jsonl,b.jsonl"],
                                    "--data a.jsonl,b.jsonl: the experiment needs three files, train,val,test"),
}


@pytest.mark.parametrize("case", list(IGNORED_FLAGS))
def test_ignored_flags_are_refused(case, tmp_path, monkeypatch):
    import importlib

    from runtime import UserError
    script, argv, message = IGNORED_FLAGS[case]
    monkeypatch.chdir(tmp_path)  # nothing to find or write there: the refusal must come first
    with pytest.raises(UserError) as e:
        importlib.import_module(script).main(argv)
    assert str(e.value).startswith(message), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_generation_caps_refused_where_nothing_is_generated(tiny, tmp_path):
    choices = tmp_path / "yn.jsonl"
    choices.write_text('{"metric": "choices", "labels": ["yes", "no"]}\n{"prompt": "a?", "response": "yes"}\n')
    r = run(sft_cmd(tiny, tmp_path / "out", "--task", "jsonl", "--data", f"{choices},{choices}"))
    one_line_error(r, "--eval-max-new-tokens 8: task jsonl is scored by the log-probability of each choice")
    assert not (tmp_path / "out").exists()
    r = run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(tiny), "--task", "pubmedqa",
             "--max-new-tokens", "8"])
    one_line_error(r, "--max-new-tokens 8: task pubmedqa is scored by the log-probability of each choice")


def test_the_import_graph_reads_one_way():
    """runtime and losses at the bottom, model and data on them, the machinery (decoding, checkpoints, training
    plumbing, flags) above, evaluation and SFT above that, the AW/SCD pieces on training, distillation on top, the
    experiment over all: every module imports only from the layers below its own."""
    import ast

    layers = [{"runtime", "losses"}, {"model", "data", "footsteps", "hub"},
              {"generate", "checkpoints", "train", "flags"},
              {"evaluate", "prepare"}, {"sft"}, {"weights"}, {"schedule"}, {"teacher_cache", "teachers", "on_policy"},
              {"distill_run"}, {"distill"}, {"heal"}, {"report"}, {"experiment", "rescore"}]
    assert {p.stem for p in ROOT.glob("*.py")} == set().union(*layers)  # every module has its place
    level = {m: i for i, names in enumerate(layers) for m in names}
    for module, i in level.items():
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        for other in imported & set(level) - {module}:
            assert level[other] < i, f"{module}.py imports {other}, which is not below it"
