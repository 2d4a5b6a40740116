"""model.py against transformers' LlamaForCausalLM: logits, save/load round trips, KV cache, bad checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from model import ModelArgs, load_model, save_model
from runtime import UserError

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    "mha_untied": dict(),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "explicit_head_dim": dict(head_dim=24, num_key_value_heads=2),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


def hf_model(**overrides):
    cfg = LlamaConfig(**{**BASE, **overrides})
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a wrong norm weight shows up
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(params=list(CONFIGS))
def hf_dir(request, tmp_path):
    m = hf_model(**CONFIGS[request.param])
    m.save_pretrained(tmp_path / "hf")
    return m, tmp_path / "hf"


def test_logits_match_transformers(hf_dir):
    hf, path = hf_dir
    ours = load_model(path).eval()
    # 80 tokens: past the llama3 config's original 32-token context, so the scaled band is exercised
    ids = torch.randint(0, BASE["vocab_size"], (2, 80))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == (2, 80, BASE["vocab_size"]) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-4


def test_rope_scaling_is_applied():
    # guard the guard: a model ignoring rope_scaling must differ from the scaled reference at long positions
    cfg = CONFIGS["llama3_rope"]
    scaled, plain = ModelArgs.from_hf_config(LlamaConfig(**{**BASE, **cfg}).to_dict()), None
    plain_cfg = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    plain = ModelArgs.from_hf_config(LlamaConfig(**{**BASE, **plain_cfg}).to_dict())
    from model import rope_inv_freq
    assert scaled.rope_scaling["rope_type"] == "llama3" and plain.rope_scaling is None
    assert not torch.allclose(rope_inv_freq(scaled), rope_inv_freq(plain))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(side, tmp_path):
    hf = hf_model(num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    lengths, T = [20, 13, 7], 20
    ids = torch.randint(3, BASE["vocab_size"], (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= 1e-4
    # each padded row equals the same sequence run alone, unpadded
    with torch.no_grad():
        for i in range(3):
            alone = ours(ids[i:i + 1, real[i]])
            assert (alone[0] - out[i, real[i]]).abs().max() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model(num_key_value_heads=2)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = load_model(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied", "llama3_rope"])
def test_save_round_trip_through_transformers(name, tmp_path):
    hf = hf_model(**CONFIGS[name])
    hf.save_pretrained(tmp_path / "a")
    ours = load_model(tmp_path / "a")
    save_model(ours, tmp_path / "b")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "b", output_loading_info=True)
    back, info = back
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (back.eval()(ids).logits - ref).abs().max() <= 1e-4
        assert (load_model(tmp_path / "b")(ids) - ref).abs().max() <= 1e-4


def test_save_model_shards_above_the_limit_and_transformers_reads_them(tmp_path):
    """save_model's own sharding (the HF layout transformers writes with max_shard_size): files under the limit
    in name order, one tensor bigger than the limit alone in its file, an index; both loaders give the same logits."""
    ours = load_model(_saved(tmp_path, **CONFIGS["mha_untied"]))
    limit = 40_000
    save_model(ours, tmp_path / "sharded", max_shard_bytes=limit)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert sorted(index["weight_map"]) == sorted(ours.state_dict())
    for f in files:
        tensors = load_file(tmp_path / "sharded" / f)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= limit or len(tensors) == 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 16))
    with torch.no_grad():
        ref = ours(ids)
        assert (hf(ids).logits - ref).abs().max() <= 1e-4
        assert torch.equal(load_model(tmp_path / "sharded")(ids), ref)


def test_activation_checkpointing_changes_no_loss_or_gradient(tmp_path):
    ours = load_model(_saved(tmp_path, **CONFIGS["gqa_tied"]))
    ids = torch.randint(0, BASE["vocab_size"], (2, 24))
    grads = []
    for on in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.set_activation_checkpointing(on)
        loss = F.cross_entropy(ours(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in ours.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_save_bf16_loads_as_fp32(tmp_path):
    ours = load_model(_saved(tmp_path, num_key_value_heads=2))
    save_model(ours, tmp_path / "bf", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path / "bf")
    assert again.model.embed_tokens.weight.dtype == torch.float32
    w0, w1 = ours.model.layers[0].mlp.up_proj.weight, again.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w0.to(torch.bfloat16).float(), w1)


def _saved(tmp_path, **overrides):
    hf_model(**overrides).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_bf16_forward_close_to_fp32(tmp_path):
    path = _saved(tmp_path, num_key_value_heads=2)
    fp32 = load_model(path).eval()
    bf16 = load_model(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids)
    assert b.dtype == torch.float32  # logits upcast
    # bf16 keeps 8 mantissa bits (rel. precision 2^-8 ~ 0.4 %); through 2 layers the logits of this random model
    # (std ~ 1) drift by a few hundredths, while an actual bug (wrong rope/norm) moves them by order 1.
    assert (a - b).abs().max() < 0.1
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.02


# --- bad checkpoints: clear one-line errors -------------------------------------------------------------------

def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file"):
        load_model(path)


def test_garbage_file(tmp_path):
    path = _saved(tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(path)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    path = _saved(tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(UserError, match=r"'model.layers.1.mlp.down_proj.weight' missing from .*model.safetensors"):
        load_model(path)


def test_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    path = _saved(tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(63)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(UserError, match=r"'model.norm.weight' has shape \(63,\)"):
        load_model(path)


def test_unexpected_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    path = _saved(tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(path)


@pytest.mark.parametrize("key,value,msg", [
    ("model_type", "mistral", "only Llama"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
])
def test_unsupported_config(key, value, msg):
    cfg = LlamaConfig(**BASE).to_dict()
    cfg.pop("rope_parameters", None)
    cfg[key] = value
    with pytest.raises(UserError, match=msg):
        ModelArgs.from_hf_config(cfg)


def test_missing_config_and_dir(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json: file not found"):
        load_model(tmp_path / "empty")


def test_cli_error_is_one_line(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(__import__('model').__file__.rsplit('/', 1)[0])!r}); " \
           f"from model import load_model; from runtime import run_cli; run_cli(lambda: load_model({str(tmp_path)!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_linear_few_rows_equals_f_linear():
    """model.Linear computes decode-sized inputs as (W @ x.T).T: the same values, in the output shape of F.linear."""
    from model import Linear
    layer = Linear(64, 96, bias=False)
    for shape in [(1, 1, 64), (2, 1, 64), (8, 5, 64), (48, 64), (3, 17, 64)]:  # rows 1, 2, 40, 48, 51
        x = torch.randn(shape)
        want = x @ layer.weight.T
        with torch.no_grad():
            got = layer(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 64)
    layer(x).sum().backward()  # with grad it is plain F.linear, which autograd knows
    torch.testing.assert_close(layer.weight.grad, x.sum((0, 1))[None].expand(96, -1))


def test_content_fingerprints(tmp_path, tiny_model_dir, monkeypatch):
    """file_sha256 is the sha256 of the bytes; a big file's hash is remembered and taken again only when the file
    changes; model_fingerprint follows the content (config and weights), not the path."""
    import hashlib
    import shutil

    import checkpoints

    monkeypatch.setattr(checkpoints, "SHA256_CACHE", tmp_path / "sha256")
    weights_file = tiny_model_dir / "model.safetensors"
    assert checkpoints.file_sha256(weights_file) == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert not (tmp_path / "sha256").exists()  # small: nothing remembered
    monkeypatch.setattr(checkpoints, "SHA256_RECORD_BYTES", 1024)
    first = checkpoints.file_sha256(weights_file)
    [record] = list((tmp_path / "sha256").iterdir())
    assert json.loads(record.read_text())["sha256"] == first
    record.write_text(record.read_text().replace(first, "0" * 64))  # a planted record is what is read back...
    assert checkpoints.file_sha256(weights_file) == "0" * 64
    weights_file.write_bytes(weights_file.read_bytes()[:-4] + b"\0\0\0\1")  # ...until the file changes
    assert checkpoints.file_sha256(weights_file) == hashlib.sha256(weights_file.read_bytes()).hexdigest() != first

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert checkpoints.model_fingerprint(copy) == checkpoints.model_fingerprint(tiny_model_dir)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "rope_theta": 5000.0}))
    assert checkpoints.model_fingerprint(copy) != checkpoints.model_fingerprint(tiny_model_dir)
