"""hub.py: Hugging Face ids resolve from a local cache the test builds itself (HF_HUB_CACHE, HF_HUB_OFFLINE=1),
single and sharded checkpoints; a missing or gated model is one error line; a run records what the id resolved to
and --resume refuses a model that moved on. Nothing here touches the network."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import hub
import sft
from model import load_model, save_model
from runtime import UserError

COMMIT, NEWER = "a" * 40, "b" * 40


def cached(cache, repo: str, model_dir, commit: str = COMMIT):
    """model_dir placed in a Hugging Face cache as repo's snapshot `commit`, which refs/main names."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return base / "snapshots" / commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local dir shadows an owner name
    return tmp_path / "hub"


def test_an_id_resolves_to_its_snapshot_single_and_sharded(cache, tiny_model_dir, tmp_path):
    snap = cached(cache, "acme/tiny", tiny_model_dir)
    path, info = hub.resolve("acme/tiny", "--model")
    assert path == str(snap) and info == {"id": "acme/tiny", "revision": COMMIT, "path": str(snap)}
    assert hub.resolve(f"acme/tiny@{COMMIT}", "--model")[0] == str(snap)
    # a sharded checkpoint: several safetensors files and their index
    model = load_model(tiny_model_dir)
    sharded = tmp_path / "sharded"
    save_model(model, sharded, max_shard_bytes=1 << 20)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, sharded / f)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    cached(cache, "acme/sharded", sharded)
    loaded = load_model(hub.resolve("acme/sharded", "--init")[0])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # an existing path is a path, and so is a name whose owner is a local dir (a run dir not made yet)
    assert hub.resolve(str(tiny_model_dir), "--model") == (str(tiny_model_dir), None)
    (tmp_path / "runs").mkdir()
    assert hub.resolve("runs/student", "--student-sft") == ("runs/student", None)


def test_missing_offline_and_gated_models_are_one_line(cache, monkeypatch):
    with pytest.raises(UserError, match=r"--model acme/missing: not a directory, and not \(whole\) in the Hugging .*"
                                        r"HF_HUB_OFFLINE=1; download it first"):
        hub.resolve("acme/missing", "--model")
    # a snapshot a partial download left (a config alone) is no model: offline, it is refused the same way
    partial = cache / "models--acme--partial" / "snapshots" / COMMIT
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    (cache / "models--acme--partial" / "refs").mkdir()
    (cache / "models--acme--partial" / "refs" / "main").write_text(COMMIT)
    with pytest.raises(UserError, match=r"--init acme/partial: not a directory, and not \(whole\) in the Hugging Face"):
        hub.resolve("acme/partial", "--init")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **kw):  # what the hub answers for a gated repo without a token (no HTTP response needed here)
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "401 gated")
        raise err

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(UserError, match="a gated model; accept its licence on huggingface.co/meta-llama/x and log in"):
        hub.resolve("meta-llama/x", "--init")


def test_a_run_records_the_snapshot_and_resume_refuses_a_moved_model(cache, tiny_model_dir, tmp_path, monkeypatch):
    cached(cache, "acme/tiny", tiny_model_dir)
    flags = ["--role", "student", "--model", "acme/tiny", "--out", str(tmp_path / "run"), "--train-size", "8",
             "--val-size", "2", "--max-len", "64", "--batch-size", "4", "--epochs", "1", "--dtype", "fp32",
             "--device", "cpu", "--lr", "1e-3"]
    sft.main(flags)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["hub"] == {"model": {"id": "acme/tiny", "revision": COMMIT, "path": config["model"]}}
    # the id moves on to a new snapshot: a resume would continue from other weights than the run started from
    cached(cache, "acme/tiny", tiny_model_dir, NEWER)
    with pytest.raises(UserError, match="--resume: .* has model="):
        sft.main([*flags, "--resume"])


def test_cli_error_is_one_line(cache):
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", "acme/missing"], capture_output=True,
                         text=True, cwd=cache.parent)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("error: --model acme/missing: not a directory")
