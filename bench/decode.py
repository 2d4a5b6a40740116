"""Greedy KV-cache decoding: our `generate.generate` vs transformers' `generate`, same model, prompts and length.

    python bench/decode.py                                # models/teacher, 8 NCBI-disease prompts, 32 new tokens
    python bench/decode.py --batch-size 1 --prompts 4     # one prompt at a time
    python bench/decode.py --model runs/teacher/step_000126 --split test --prompts 64 --batch-size 16 --sort \
        --eos --max-new-tokens 0                          # what evaluate.py does with a fine-tuned model

The prompts are real: the first --prompts examples of the task's --split, chat-rendered by data.encode_prompt, run
in batches of --batch-size (sorted by length first with --sort, as evaluate.py does), left-padded: both sides get
the same ids and attention mask. By default no eos stops either side, so both produce exactly --max-new-tokens per
prompt. With --eos both stop at the end-of-turn token; transformers keeps a batch running until its last row stops,
ours drops finished rows. Ours checks --lookahead prompt-lookup guesses per step (0: one token at a time). Runs of
the two alternate, --rounds times, so load from other processes on this machine hits both alike; the median of the
per-round time ratios is the speed-up. In fp32 the outputs must be identical token for token (it exits 1 if not).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import add_threads_arg, set_threads  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from generate import generate, left_pad  # noqa: E402
from model import load_model  # noqa: E402
from runtime import UserError, run_cli  # noqa: E402


def autocast_run(autocast, fn):
    with autocast:
        return fn()


def run_ours(model, batches, n_new, eos_id, pad_id, lookahead):
    return [out for b in batches for out in generate(model, b, n_new, eos_id=eos_id, pad_id=pad_id,
                                                     lookahead=lookahead)]


@torch.no_grad()
def run_hf(model, batches, n_new, eos_id, pad_id, lookahead):
    outs = []
    lookup = {"prompt_lookup_num_tokens": lookahead} if lookahead else {}
    for b in batches:
        ids, mask = left_pad(b, pad_id, model.device)
        mask = mask.long()  # transformers' usual mask dtype
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                             use_cache=True, eos_token_id=eos_id, pad_token_id=pad_id, **lookup)[:, ids.shape[1]:]
        for row in new.tolist():  # cut at the first eos, as ours does
            outs.append(row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return outs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="models/teacher", help="HF Llama model dir (with its tokenizer)")
    p.add_argument("--task", default="ncbi_disease", help="task whose training prompts are decoded")
    p.add_argument("--split", default="train", help="split whose first --prompts examples are decoded")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--sort", action="store_true", help="sort the prompts by length before batching (evaluate.py)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (0: the task's cap)")
    p.add_argument("--lookahead", type=int, default=evaluate.LOOKAHEAD,
                   help="prompt-lookup guesses our generate checks per step (0: one token at a time)")
    p.add_argument("--hf-lookahead", type=int, default=0,
                   help="transformers' own prompt lookup (prompt_lookup_num_tokens; it takes --batch-size 1 only)")
    p.add_argument("--eos", action="store_true", help="stop each prompt at the end-of-turn token (default: never "
                                                      "stop, so both sides generate exactly --max-new-tokens)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], default="fp32",
                   help="both models: fp32 weights, bf16 weights, or fp32 weights under bf16 autocast (what "
                        "evaluate.py --dtype bf16 does)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs ours and transformers once)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (outputs are read back each call, so timing syncs)")
    add_threads_arg(p)
    a = p.parse_args()
    set_threads(a.threads)
    if a.hf_lookahead and a.batch_size != 1:
        raise UserError("--hf-lookahead: transformers' prompt lookup runs one prompt at a time; add --batch-size 1")
    from transformers import LlamaForCausalLM

    tok = data.load_tokenizer(a.model)
    examples = data.load_examples(a.task, a.split, limit=a.prompts)
    prompts = [data.encode_prompt(tok, ex) for ex in examples]
    if a.sort:
        prompts.sort(key=len)
    a.max_new_tokens = a.max_new_tokens or data.get_task(a.task).max_new_tokens
    batches = [prompts[i:i + a.batch_size] for i in range(0, len(prompts), a.batch_size)]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    device = torch.device(a.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "autocast")
    ours = load_model(a.model, device=device, dtype=dtype).eval()
    hf = LlamaForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    hf.generation_config.eos_token_id = None  # else it falls back to the model's own eos
    eos = tok.eos_id if a.eos else None
    runs = {"ours": lambda: run_ours(ours, batches, a.max_new_tokens, eos if a.eos else -1, tok.pad_id, a.lookahead),
            "hf": lambda: run_hf(hf, batches, a.max_new_tokens, eos, tok.pad_id, a.hf_lookahead)}
    runs = {k: (lambda fn=fn: autocast_run(autocast, fn)) for k, fn in runs.items()}
    print(f"{a.model}: {ours.num_params() / 1e6:.1f}M params {a.dtype} on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(prompts)} {a.task} prompts ({min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens) of {a.split} in batches of {a.batch_size}, up to {a.max_new_tokens} new "
          f"tokens, eos {'on' if a.eos else 'off'}, lookahead ours {a.lookahead}, transformers {a.hf_lookahead}")
    print("the two alternate, so load from other processes hits both; medians are compared")
    outs, times = {}, {k: [] for k in runs}
    for k, fn in runs.items():  # warm-up, untimed
        outs[k] = fn()
    for _ in range(a.rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    n_tokens = {k: sum(len(o) for o in v) for k, v in outs.items()}
    for k, label in (("hf", "transformers generate"), ("ours", "ours generate.generate")):
        t = statistics.median(times[k])
        print(f"  {label:22s} {t:7.2f} s  {n_tokens[k] / t:7.1f} new tok/s  (rounds: "
              f"{', '.join(f'{x:.2f}' for x in times[k])})")
    ratio = statistics.median(h / o for h, o in zip(times["hf"], times["ours"]))
    print(f"speed-up of ours vs transformers (median of per-round ratios): {ratio:.2f}x")
    same = outs["ours"] == outs["hf"]
    differ = [i for i, (x, y) in enumerate(zip(outs["ours"], outs["hf"])) if x != y]
    print(f"greedy outputs identical token for token: {'yes' if same else 'NO, prompts ' + str(differ)}")
    if not same and a.dtype == "fp32":
        sys.exit(1)
    if not same:
        print("(bf16: the two round differently (our single-query attention runs in fp32), so near-tied logits "
              "can pick different tokens; fp32 must match)")


if __name__ == "__main__":
    run_cli(main)
