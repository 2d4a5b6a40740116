"""The CUDA paths, where a GPU is (skipped elsewhere, as in CI): the model against transformers on the same device,
and one SFT step, one distillation step and greedy decoding against the same code on the CPU, whose own oracles are
the other test files. Random configs only (no real checkpoint), so a GPU machine needs no model files to run it:

    python -m pytest tests/test_cuda.py
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from test_model import BASE, CONFIGS, hf_model

import data
import distill
import runtime
import train
from generate import generate
from losses import KDTerm
from model import load_model
from teachers import ModelTeacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
V = BASE["vocab_size"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    """transformers' model and ours, from the same weights, both on the GPU."""
    hf = hf_model(**CONFIGS[request.param])
    hf.save_pretrained(tmp_path)
    return hf.to(CUDA), load_model(tmp_path).eval().to(CUDA)


def test_logits_match_transformers_on_cuda(pair):
    hf, ours = pair
    ids = torch.randint(0, V, (2, 80), device=CUDA)  # past the llama3 config's 32-token original context
    with torch.no_grad():
        ref, out = hf(ids).logits, ours(ids)
    assert (out - ref).abs().max() <= 1e-4  # fp32 (no TF32: nothing here turns it on), as on the CPU


def test_bf16_autocast_is_as_close_to_fp32_as_transformers_bf16(pair):
    """Under bf16 autocast each model rounds differently, so the oracle is transformers' own bf16 error against
    the fp32 logits: ours may be no more than twice that."""
    hf, ours = pair
    ids = torch.randint(0, V, (4, 64), device=CUDA)
    with torch.no_grad():
        ref = hf(ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hf_bf16, ours_bf16 = hf(ids).logits.float(), ours(ids).float()
    assert rel_err(ours_bf16, ref) <= 2 * rel_err(hf_bf16, ref)
    # --dtype auto: bf16 only on cards with bf16 tensor cores (Ampere, compute capability 8, and later)
    assert runtime.resolve_dtype("auto", CUDA) == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32")


def items(n: int, seed: int) -> list[dict]:
    """n examples of 12-30 tokens, the last 2-8 of them the answer (labels -100 on the prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t, a = int(torch.randint(12, 31, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(1, V, (t,), generator=g).tolist()
        out.append({"id": f"x{i}", "input_ids": ids, "labels": [-100] * (t - a) + ids[t - a:]})
    return out


@pytest.fixture
def models(tmp_path):
    """A student (1 layer) and a sharper teacher (2 layers), both of ours, on the CPU."""
    hf_model(num_key_value_heads=2, num_hidden_layers=1).save_pretrained(tmp_path / "s")
    hf_model(num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(tmp_path / "t")
    student, teacher = load_model(tmp_path / "s"), load_model(tmp_path / "t").eval().requires_grad_(False)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(4.0)  # a peaked teacher, so KD is far from its value at uniform
    return student, teacher


def grads(model) -> dict:
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def test_sft_step_on_cuda_equals_the_cpu_step(models):
    student, _ = models
    micro = [data.collate(b, 0) for b in (items(4, 0), items(3, 1))]
    cpu, gpu = copy.deepcopy(student), copy.deepcopy(student).to(CUDA)
    loss_c, norm_c, n_c = train.train_step(cpu, micro, CPU, "fp32")
    loss_g, norm_g, n_g = train.train_step(gpu, micro, CUDA, "fp32")
    assert n_c == n_g and loss_g == pytest.approx(loss_c, rel=1e-5) and norm_g == pytest.approx(norm_c, rel=1e-4)
    gc, gg = grads(cpu), grads(gpu)
    for name in gc:
        assert rel_err(gg[name], gc[name]) < 1e-4, name
    bf16 = copy.deepcopy(student).to(CUDA)  # the GPU preset's dtype: the same loss to bf16's 8 mantissa bits
    loss_b, _, _ = train.train_step(bf16, micro, CUDA, "bf16")
    assert loss_b == pytest.approx(loss_c, rel=2e-2)


@pytest.mark.parametrize("aw", [True, False])
def test_distill_step_on_cuda_equals_the_cpu_step(models, aw):
    student, teacher = models
    micro = [data.collate(b, 0) for b in (items(4, 2), items(4, 3))]
    l_stu = {f"x{i}": 0.5 + i for i in range(4)}  # L_stuSFT per sample: w differs by sample
    lookup = (lambda ids: torch.tensor([l_stu[i] for i in ids])) if aw else None
    args = SimpleNamespace(aw=aw, alpha=0.5, beta=0.5, lam=0.1, dtype="fp32", loss="fkl", temperature=1.0)
    cpu = copy.deepcopy(student)
    gpu = copy.deepcopy(student).to(CUDA)
    ref = distill.distill_step(cpu, ModelTeacher(teacher, CPU, "fp32"), lookup, KDTerm.of(args), micro, args.alpha, CPU,
                               "fp32")
    out = distill.distill_step(gpu, ModelTeacher(copy.deepcopy(teacher).to(CUDA), CUDA, "fp32"), lookup,
                               KDTerm.of(args), micro, args.alpha, CUDA, "fp32")
    for k in ("loss", "kd", "ce", "w", "grad_norm"):
        assert out[k] == pytest.approx(ref[k], rel=1e-4), k
    gc, gg = grads(cpu), grads(gpu)
    for name in gc:
        assert rel_err(gg[name], gc[name]) < 1e-4, name


@pytest.mark.parametrize("lookahead", [0, 4])
def test_greedy_decoding_on_cuda_equals_the_cpu(models, lookahead):
    """Batched, left-padded, KV-cached greedy decoding (and its lookahead path): the same tokens on both devices,
    with no stop token (every row runs 24 tokens) and with a stop token that one row emits early (that row leaves
    the batch, the KV cache is compacted, the others go on)."""
    _, teacher = models
    prompts = [it["input_ids"] for it in items(5, 4)]
    gpu_teacher = copy.deepcopy(teacher).to(CUDA)
    ref = generate(teacher, prompts, 24, eos_id=V, lookahead=lookahead)  # V: no token of the vocabulary
    assert generate(gpu_teacher, prompts, 24, eos_id=V, lookahead=lookahead) == ref
    assert all(len(o) == 24 for o in ref)
    eos = ref[0][5]  # row 0's sixth token: it stops there, before 24
    ref = generate(teacher, prompts, 24, eos_id=eos, lookahead=lookahead)
    assert generate(gpu_teacher, prompts, 24, eos_id=eos, lookahead=lookahead) == ref
    assert len(ref[0]) <= 5 and eos not in ref[0]
