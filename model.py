"""Llama in plain PyTorch: the forward pass and Hugging Face safetensors load/save.

The student, every teacher checkpoint and the frozen SFT student of SCD (arXiv 2601.10114, Sec. 3) are all
instances of this one model. Parameter names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...),
so any LlamaForCausalLM checkpoint loads with a strict state-dict load and no mapping table, and what we save
loads back into transformers. Decoding with a KV cache is in generate.py; the cache enters here at one seam
(`cache.begin` / `cache.attend`).
"""

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runtime import UserError, read_json

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536  # MLP intermediate size
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)  # token ids etc., kept only so save -> load round-trips

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read a HF Llama config.json dict; refuse (naming the key) anything this model cannot represent."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or archs != ["LlamaForCausalLM"]:
            raise UserError(f"config.json: model_type={cfg.get('model_type')!r} architectures={archs}: "
                            "only Llama (LlamaForCausalLM) is supported")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UserError(f"config.json: {key}=true is not supported (Llama has no biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(f"config.json: hidden_act={cfg['hidden_act']!r} is not supported, only 'silu'")
        if cfg.get("pretraining_tp", 1) != 1:
            raise UserError(f"config.json: pretraining_tp={cfg['pretraining_tp']} is not supported, only 1")
        # transformers >= 5 writes `rope_parameters` (theta + scaling in one dict); older configs split them
        scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                raise UserError(f"config.json: rope_scaling type {kind!r} is not supported, only 'llama3' or none")
            else:
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if any(k not in scaling for k in keys):
                    raise UserError(f"config.json: llama3 rope_scaling needs {', '.join(keys)}")
                scaling = {"rope_type": "llama3", **{k: scaling[k] for k in keys}}
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise UserError(f"config.json: num_attention_heads={n_heads} is not a multiple of "
                            f"num_key_value_heads={n_kv_heads}")
        keep = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")
        return cls(
            dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads, hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta, rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            extra={k: cfg[k] for k in keep if cfg.get(k) is not None},
        )

    def to_hf_config(self, dtype: torch.dtype | None = None) -> dict:
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            **self.extra,
        }
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        return cfg

# -----------------------------------------------------------------------------
# the model


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,) in fp32, with Llama-3.1 `rope_scaling` applied if configured."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between is interpolated smoothly
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept_or_scaled = torch.where(wavelen < old_ctx / high, inv_freq, scaled)
    return torch.where(wavelen > old_ctx / low, inv_freq / factor, kept_or_scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos/sin (B, 1, T, hd). HF's rotate-half convention: pairs are (i, i + hd/2), not (2i, 2i+1)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the mean of squares in fp32: in bf16 it loses the digits that matter for large activations
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that computes a few rows (decode steps, no grad, fp32 on the CPU) as (W @ x.T).T: MKL runs that
    shape faster than x @ W.T for a handful of rows (bench/linear_rows.py). The same products, summed in another
    order."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if (1 < rows <= 48 and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and self.bias is None and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
            return torch.mm(self.weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding (generate.KVCache): this pass's keys join the cached ones
            y = cache.attend(layer, q, k, v, mask)
        else:
            # mask None means plain causal attention, which is exact for unpadded and right-padded batches.
            # enable_gqa: SDPA shares each k/v head among n_heads/n_kv_heads query heads without copying k, v
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The `model.` prefix of HF's tensor names: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        self.activation_checkpointing = False
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(args.head_dim // 2), persistent=False)
        self.register_buffer("rope_cos", torch.empty(0, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, args.head_dim), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.init_rope()

    def init_rope(self, device=None, max_len: int = 4096):
        """(Re)build the fp32 cos/sin tables once; `rope_table` grows them if a longer sequence comes."""
        device = device or self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.args).to(device)
        self.rope_cos = self.rope_sin = torch.empty(0, self.args.head_dim, device=device)
        self.rope_table(max_len)

    def rope_table(self, n: int):
        if n > self.rope_cos.shape[0]:
            n = max(n, 2 * self.rope_cos.shape[0])
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
            self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        return self.rope_cos, self.rope_sin

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Final-normed hidden states (B, T, D). attention_mask (B, T): 1 for real tokens, left or right padding."""
        B, T = input_ids.shape
        mask = None
        if cache is not None:  # the cache decides what each new token attends to, and where it sits
            mask, position_ids = cache.begin(input_ids, attention_mask, position_ids)
        elif attention_mask is not None and not is_right_padded(attention_mask):
            m = attention_mask.bool()
            causal = torch.ones(T, T, dtype=torch.bool, device=m.device).tril()
            mask = ((causal & m[:, None, :]) | torch.eye(T, dtype=torch.bool, device=m.device))[:, None]
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:  # count only real tokens, so left padding does not shift positions
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.rope_table(int(position_ids.max()) + 1)
        dtype = self.model.embed_tokens.weight.dtype
        cos = cos[position_ids].to(dtype)[:, None]  # (B, 1, T, hd)
        sin = sin[position_ids].to(dtype)[:, None]

        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            if recompute:  # keep only the layer's input; backward runs the layer again
                x = checkpoint(layer, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        return self.model.norm(x)

    def set_activation_checkpointing(self, on: bool = True):
        """Per decoder layer: store only its input in forward and recompute the rest in backward."""
        self.activation_checkpointing = on

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        # fp32 out: losses and sampling take softmax over the vocab, where bf16 rounding shifts probabilities
        return self.lm_head(h).float()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        return self.lm_logits(self.hidden(input_ids, attention_mask, position_ids, cache))  # (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros, so plain causal attention is already exact."""
    m = attention_mask.long()
    return bool((m.cumprod(-1) == m).all())

# -----------------------------------------------------------------------------
# loading and saving Hugging Face checkpoints


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map'")
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_checkpoint(path: Path, expected: dict, tied: bool, read) -> dict:
    """{name: read(file, f, name)} for every tensor of a checkpoint dir, `f` being `file` opened by safe_open; each
    is checked by name and shape against `expected` first, and none may be missing. Stored rotary buffers and a tied
    lm_head are skipped."""
    from safetensors import SafetensorError, safe_open

    state = {}
    for file in checkpoint_files(path):
        if not file.is_file():
            raise UserError(f"{file}: shard listed in the index is missing")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied):
                        continue  # derived buffers some exporters store; a tied head duplicates the embeddings
                    if name not in expected:
                        raise UserError(f"{file}: unexpected tensor {name!r} for this Llama config")
                    shape = torch.Size(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise UserError(f"{file}: tensor {name!r} has shape {tuple(shape)}, "
                                        f"config.json implies {tuple(expected[name])}")
                    state[name] = read(file, f, name)
        except SafetensorError as e:
            raise UserError(f"{file}: not a valid safetensors file ({e})") from None
        except OSError as e:
            raise UserError(f"{file}: cannot read ({e})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        files = ", ".join(str(f) for f in checkpoint_files(path))
        raise UserError(f"{path}: tensor {missing[0]!r} missing from {files}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return state


def shard_rows(p) -> tuple[int, int]:
    """The rows [start, stop) of the full tensor that this rank's shard of the FSDP2 parameter `p` holds: dim 0 cut
    into world-size chunks of ceil(rows / world) each (torch.chunk), so the last ranks' may be shorter or empty."""
    from torch.distributed.tensor import Shard

    assert tuple(p.placements) == (Shard(0),), p.placements
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    size = -(-n // world)
    start = min(rank * size, n)
    stop = min(start + size, n)
    assert stop - start == p.to_local().shape[0], (p.shape, p.to_local().shape, start, stop)
    return start, stop


@torch.no_grad()
def read_shard(params: dict, dtype: torch.dtype, file: Path, f, name: str) -> torch.Tensor:
    """Copy this rank's rows of tensor `name` into its FSDP2 shard. The rows are read through a mapping of their own,
    unmapped once they are copied: pages read through the file's shared mapping would stay in this process's
    resident set until the whole file is done."""
    from safetensors import safe_open

    start, stop = shard_rows(params[name])
    with safe_open(file, framework="pt", device="cpu") as own:
        return params[name].to_local().copy_(own.get_slice(name)[start:stop].to(dtype))


def load_model(path, device="cpu", dtype=torch.float32, shard=None) -> Transformer:
    """Load a HF Llama checkpoint dir: build on the meta device, then fill each tensor from mmapped safetensors.

    `shard` (runtime.shard, under torchrun) wraps the model in FSDP units while it is still on the meta device; each
    rank then allocates and reads only its own rows of every tensor (safetensors' get_slice), so no rank ever holds
    the whole model. In one process `shard` changes nothing and every tensor is read whole."""
    from torch.distributed.tensor import DTensor

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found")
    args = ModelArgs.from_hf_config(read_json(path / "config.json"))
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = args.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    if shard is not None:
        model = shard(model.to(dtype))
    if isinstance(model.lm_head.weight, DTensor):
        model.to_empty(device=device)  # this rank's shards, uninitialised; a tied head stays tied
        read_checkpoint(path, expected, tied, partial(read_shard, dict(model.named_parameters()), dtype))
    else:
        state = read_checkpoint(path, expected, tied,
                                lambda file, f, name: f.get_tensor(name).to(device=device, dtype=dtype))
        model.load_state_dict(state, strict=not tied, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    return model


MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size: above it the weights go in several files


def save_model(model: Transformer, path, dtype: torch.dtype | None = None, state: dict | None = None,
               max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write config.json + model.safetensors (HF names; a tied lm_head is not stored). Not atomic by itself.

    `state` is the model's full state dict when it is not the model's own (runtime.full_state_dict under FSDP,
    whose parameters are shards). Weights above `max_shard_bytes` are split, in state-dict order, into
    model-0000k-of-0000n.safetensors files of at most that size (one bigger tensor gets a file of its own), with the
    model.safetensors.index.json map that transformers and load_model read."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in (model.state_dict() if state is None else state).items():
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        tensors[name] = (t.to(dtype) if dtype is not None else t).detach().contiguous().cpu()
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    out_dtype = dtype or next(iter(tensors.values())).dtype
    (path / "config.json").write_text(json.dumps(model.args.to_hf_config(out_dtype), indent=2) + "\n")
