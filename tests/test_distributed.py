"""torchrun with 2 ranks on the CPU (gloo, FSDP2) against one process: the same losses, schedule and weights, a
kill -9 mid-stage or at a stage boundary that resumes to the same weights, a sharded export that transformers loads,
checkpoints read row by row into the shards of a whole load, and the validation loss split over the ranks. Each
launch is a real `torchrun --nproc_per_node 2` of the script, as a user would type it, or of this file's checks that
run on the ranks (its __main__ block)."""

import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, make_teacher_runs, make_tiny_model
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import checkpoints
import distill
import runtime
import sft
import weights
from model import ModelArgs, Transformer, checkpoint_files, load_model, save_model
from train import eval_loss

# 21 examples at a global batch of 4: the last batch of each epoch has one example, so one rank's share is empty
SFT_FLAGS = ["--role", "student", "--train-size", "21", "--val-size", "2", "--max-len", "64", "--epochs", "2",
             "--checkpoints", "4", "--eval-max-new-tokens", "4", "--eval-batch-size", "4", "--log-every", "1",
             "--dtype", "fp32", "--device", "cpu", "--lr", "1e-3"]
# fp32: the ranks sum their gradients in another order than one process does. Losses agree to 1e-5 relative; a
# weight whose gradient is near 0 takes an Adam step of up to lr * sign(noise), so weights get atol 1e-5 = lr / 100
TOL = dict(rtol=1e-5, atol=1e-5)


def torchrun(script: str, *args, wait: bool = True):
    """`torchrun --standalone --nproc_per_node 2 script args` from the repo root, one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:  # its own process group, so a kill -9 takes torchrun and both ranks
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in s]


def assert_same_weights(a, b, exact: bool = False):
    a, b = load_file(a), load_file(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], **TOL), k


@pytest.fixture(scope="module")
def tiny(module_tmp, tokenizer_dir):
    return make_tiny_model(module_tmp("tiny") / "m", tokenizer_dir, n_layers=2, dim=32)


@pytest.fixture(scope="module")
def sft_runs(tiny, module_tmp):
    """The same SFT: one process with batch 4, and 2 ranks with batch 2 each (activation checkpointing on, which
    must not change a number)."""
    root = module_tmp("sft")
    sft.main(["--model", str(tiny), "--out", str(root / "one"), "--batch-size", "4", *SFT_FLAGS])
    torchrun("sft.py", "--model", tiny, "--out", root / "two", "--batch-size", 2, "--activation-checkpointing",
             *SFT_FLAGS)
    return root / "one", root / "two"


def test_two_ranks_give_the_losses_and_weights_of_one_process_at_twice_the_batch(sft_runs):
    one, two = sft_runs
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x["tokens_seen"] == y["tokens_seen"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                   rel=1e-4)
    steps = [checkpoints.read_checkpoint_index(run)["steps"] for run in (one, two)]
    assert steps[0] == steps[1] == [3, 6, 9, 12]
    for step in (6, 12):
        assert_same_weights(one / checkpoints.checkpoint_name(step) / "model.safetensors",
                            two / checkpoints.checkpoint_name(step) / "model.safetensors")
    config = json.loads((two / "config.json").read_text())
    assert config["world"] == 2 and config["batch_size"] == 2
    # the resume state of a 2-rank run is sharded by rank, and only the newest checkpoint keeps one
    final = two / "step_000012"
    assert (final / "dcp" / ".metadata").exists() and (final / "rng_rank1.safetensors").exists()
    assert not (two / "step_000009" / "dcp").exists()


def test_kill_9_of_two_ranks_resumes_to_the_weights_of_the_straight_run(sft_runs, tiny, tmp_path):
    straight = sft_runs[1]
    out = tmp_path / "killed"
    args = ["--model", tiny, "--out", out, "--batch-size", 2, "--activation-checkpointing", *SFT_FLAGS]
    proc = torchrun("sft.py", *args, wait=False)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if checkpoints.latest_resumable(out) is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step, _ = checkpoints.latest_resumable(out)
    assert step < 12 and not (out / "step_000012").exists()
    torchrun("sft.py", *args, "--resume")
    assert_same_weights(straight / "step_000012" / "model.safetensors", out / "step_000012" / "model.safetensors",
                        exact=True)
    # one process cannot take over a 2-rank resume state: refused by name, nothing written
    r = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(tiny), "--out", str(out),
                        "--batch-size", "2", *SFT_FLAGS, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "world=2" in r.stderr, r.stderr


def test_sharded_export_loads_in_transformers_with_equal_logits(tiny, tmp_path):
    """--max-shard-gb below the model's size: model-0000k-of-0000n files and their index, gathered and written by
    rank 0; transformers and load_model read them to the same logits."""
    out = tmp_path / "run"
    torchrun("sft.py", "--model", tiny, "--out", out, "--batch-size", 2, "--max-shard-gb", 0.002, "--role", "student",
             "--train-size", 8, "--val-size", 2, "--max-len", 64, "--epochs", 1, "--checkpoints", 1,
             "--eval-max-new-tokens", 4, "--dtype", "fp32", "--device", "cpu")
    final = out / "step_000002"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (final / "model.safetensors").exists()
    assert all((final / f).stat().st_size <= 0.002 * 2**30 + 2**16 or len(load_file(final / f)) == 1
               for f in files)  # a shard is under the limit, or one tensor bigger than it alone
    ours = load_model(final)
    hf = AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def teacher_runs(module_tmp, tokenizer_dir):
    return make_teacher_runs(module_tmp("runs"), tokenizer_dir)


def distill_flags(runs, out, *extra):
    """9 examples at a global batch of 4: each epoch's last batch leaves rank 1 empty, while the sharded teacher's
    forward still needs it."""
    root, init = runs
    return ["--teacher", root / "teacher", "--init", init, "--out", out, "--student-sft", root / "student",
            "--aw-table", root / "no_table", "--probe-cache", root / "probe_cache", "--probe-size", 3,
            "--eval-split", "none", "--train-size", 9, "--val-size", 2, "--max-len", 96, "--stages", 3,
            "--stage-steps", 2, "--eval-batch-size", 4, "--log-every", 1, "--device", "cpu", "--lr", "1e-3",
            "--dtype", "fp32", *extra]


@pytest.fixture(scope="module")
def distill_runs(teacher_runs, module_tmp):
    """SCD+AW in one process at batch 4, and on 2 ranks at batch 2 with the teacher sharded (also the straight run
    of the kill test: --save-every only places resume states, the run is bit-identical with or without it)."""
    root = module_tmp("distill")
    distill.main([str(a) for a in distill_flags(teacher_runs, root / "one", "--batch-size", 4)])
    torchrun("distill.py", *distill_flags(teacher_runs, root / "shard", "--batch-size", 2, "--save-every", 1))
    return root


@pytest.mark.parametrize("sharding", ["shard", "replicate"])
def test_distill_scd_aw_on_two_ranks_picks_the_checkpoints_of_one_process(sharding, teacher_runs, distill_runs):
    """SCD's probe metrics and choices, AW's weights and the losses of every step, and the final student."""
    one, two = distill_runs / "one", distill_runs / sharding
    if sharding != "shard":
        torchrun("distill.py", *distill_flags(teacher_runs, two, "--batch-size", 2, "--teacher-sharding", sharding))
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    # KD and the SCD metrics are KLs between nearly equal distributions (~0.01 nats): sums of terms that cancel, so
    # their fp32 rounding is absolute (~1e-7, and it moves with the thread count), not relative
    for x, y in zip(a, b):
        for key in ("loss", "kd", "ce", "w"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    sched = [[json.loads(s) for s in (run / "schedule.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["chosen"] for r in sched[0]] == [r["chosen"] for r in sched[1]]
    for r1, r2 in zip(*sched):
        for c1, c2 in zip(r1["candidates"], r2["candidates"]):
            assert c1["ckpt"] == c2["ckpt"]
            for m in ("metric1", "metric2"):
                assert c1[m] == pytest.approx(c2[m], rel=1e-5, abs=1e-6), m
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


def kill_at_first_resume_state(flags: list, out):
    """A 2-rank distill.py run with `flags`, killed (-9, every rank) as soon as out/resume holds a complete state."""
    proc = torchrun("distill.py", *flags, wait=False)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if checkpoints.latest_resumable(out / "resume") is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_distill_kill_9_of_two_ranks_mid_stage_resumes_to_the_same_student(teacher_runs, distill_runs, tmp_path):
    """Killed right after its first resume state (mid-stage: the optimiser's shards are in it), resumed on 2 ranks:
    the final student of a straight 2-rank run, bit for bit."""
    out = tmp_path / "killed"
    flags = distill_flags(teacher_runs, out, "--batch-size", 2, "--save-every", 1)
    kill_at_first_resume_state(flags, out)
    assert not (out / "final").exists()
    torchrun("distill.py", *flags, "--resume")
    assert_same_weights(distill_runs / "shard" / "final" / "model.safetensors", out / "final" / "model.safetensors",
                        exact=True)


def test_distill_kill_9_of_two_ranks_at_a_stage_boundary_resumes_to_the_same_student(teacher_runs, distill_runs,
                                                                                      tmp_path):
    """Without --save-every the stage ends hold the only resume states: killed right after the first (stage 0's
    export, then the state with the next stage not yet chosen), resumed on 2 ranks from the DCP shards with a new
    optimiser: the final student of the straight 2-rank run, bit for bit."""
    out = tmp_path / "killed"
    flags = distill_flags(teacher_runs, out, "--batch-size", 2)
    kill_at_first_resume_state(flags, out)
    _, state = checkpoints.latest_resumable(out / "resume")
    progress = json.loads((state / checkpoints.STATE_FILES[1]).read_text())
    assert progress["k"] == 0 and progress["chosen"] is None and (state / "dcp" / ".metadata").exists()
    assert (out / "stage_00").exists() and not (out / "final").exists()
    torchrun("distill.py", *flags, "--resume")
    assert_same_weights(distill_runs / "shard" / "final" / "model.safetensors", out / "final" / "model.safetensors",
                        exact=True)


def test_weights_on_two_ranks_score_every_example_as_one_process(teacher_runs, tmp_path):
    root, _ = teacher_runs
    flags = ["--teacher", root / "teacher", "--student-sft", root / "student", "--train-size", 10, "--max-len", 96,
             "--batch-size", 3, "--device", "cpu", "--dtype", "fp32"]
    weights.main([str(a) for a in [*flags, "--out", tmp_path / "one"]])
    torchrun("weights.py", *flags, "--out", tmp_path / "two")
    a, b = load_file(tmp_path / "one" / "losses.safetensors"), load_file(tmp_path / "two" / "losses.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    split = [weights.final_split(json.loads((tmp_path / d / "sfs_tfs.json").read_text())) for d in ("one", "two")]
    assert split[0]["sfs_ids"] == split[1]["sfs_ids"]


@pytest.mark.parametrize("script", ["evaluate.py", "experiment.py"])
def test_one_process_scripts_refuse_torchrun(script):
    """Launched as a rank of a torchrun job (its environment), a one-process script says so in one line and writes
    nothing: N copies would write the same files."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{script} runs in one process" in r.stderr

# -----------------------------------------------------------------------------
# checks run on the ranks themselves: `torchrun tests/test_distributed.py CHECK ARGS` (see the __main__ block)


def odd_model(path) -> Path:
    """An untied random Llama whose vocabulary (101 rows) and MLP width (37) do not split evenly over 2 ranks,
    saved as three model-0000k-of-00003 files with an index."""
    torch.manual_seed(0)
    args = ModelArgs(dim=24, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=8, hidden_dim=37, vocab_size=101,
                     tie_word_embeddings=False)
    save_model(Transformer(args), path, max_shard_bytes=20000)
    assert len(checkpoint_files(Path(path))) == 3
    return Path(path)


def on_ranks_sharded_load(*model_dirs):
    """For each model dir, fp32 and bf16: every rank's shards read row by row from the files (load_model with
    `shard`) are those of a whole load followed by runtime.shard, bit for bit, and so are the rope buffers and the
    logits; rank 0's gathered state dict is the files' tensors."""
    device = torch.device("cpu")
    for path in model_dirs:
        for dtype in (torch.float32, torch.bfloat16):
            whole = runtime.shard(load_model(path, dtype=dtype), device)
            rows = load_model(path, dtype=dtype, shard=lambda m: runtime.shard(m, device))
            a, b = dict(whole.named_parameters()), dict(rows.named_parameters())
            assert a.keys() == b.keys()
            for name, p in b.items():
                assert isinstance(p, DTensor) and p.dtype == dtype and p.placements == a[name].placements, name
                assert torch.equal(p.to_local(), a[name].to_local()), name
            assert (rows.lm_head.weight is rows.model.embed_tokens.weight) == rows.args.tie_word_embeddings
            for name, buf in whole.named_buffers():
                assert torch.equal(buf, dict(rows.named_buffers())[name]), name
            ids = torch.randint(0, rows.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                assert torch.equal(whole(ids), rows(ids))
            state = runtime.full_state_dict(rows)
            if runtime.is_main():
                files = {}
                for file in checkpoint_files(Path(path)):
                    files.update(load_file(file))
                if rows.args.tie_word_embeddings:
                    files["lm_head.weight"] = files["model.embed_tokens.weight"]
                assert state.keys() == files.keys()
                for name, t in files.items():
                    assert torch.equal(state[name], t.to(dtype)), name


EVAL_CASES = ((5, 2), (1, 4), (8, 2))  # (items, batch size): 2 ranks score 3 + 2, 1 + 0 and 4 + 4 of them


def eval_items(n: int) -> list[dict]:
    """n encoded examples of 6 to 20 tokens whose last 1 to 5 tokens are the answer, the same in every process."""
    g = torch.Generator().manual_seed(n)
    items = []
    for i in range(n):
        length, answer = int(torch.randint(6, 21, (), generator=g)), int(torch.randint(1, 6, (), generator=g))
        ids = torch.randint(0, 1000, (length,), generator=g).tolist()
        items.append({"id": str(i), "input_ids": ids, "labels": [-100] * (length - answer) + ids[-answer:]})
    return items


def on_ranks_eval_loss(model_dir, out):
    """train.eval_loss of the sharded model for each of EVAL_CASES, and how many forwards this rank ran, to
    out/rank<r>.json."""
    device = torch.device("cpu")
    model = load_model(model_dir, shard=lambda m: runtime.shard(m, device))
    forwards = [0]
    model.model.layers[0].register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    rows = []
    for n, batch_size in EVAL_CASES:
        forwards[0] = 0
        loss = eval_loss(model, eval_items(n), 0, batch_size, device, "fp32")
        rows.append({"items": n, "batch_size": batch_size, "loss": loss, "forwards": forwards[0]})
    Path(out, f"rank{runtime.rank()}.json").write_text(json.dumps(rows))


ON_RANKS = {"sharded_load": on_ranks_sharded_load, "eval_loss": on_ranks_eval_loss}


def test_sharded_load_gives_every_rank_the_shards_of_a_whole_load(tiny, tmp_path):
    """Tied embeddings in one file, and an untied model in three files whose rows do not divide evenly; fp32 and a
    bf16 copy of each (a torchrun --dtype bf16 teacher)."""
    torchrun("tests/test_distributed.py", "sharded_load", tiny, odd_model(tmp_path / "odd"))


def test_eval_loss_on_two_ranks_is_the_one_process_value(tiny, tmp_path):
    """Each rank scores its share and the sums are all-reduced: the one-process value up to float rounding
    (rel 1e-6: each rank's batches hold other examples, so other matmul shapes and another order of the fp32 sums).
    Every rank runs as many forwards as rank 0, also one with no example of its own."""
    torchrun("tests/test_distributed.py", "eval_loss", tiny, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model = load_model(tiny)
    for (n, batch_size), r0, r1 in zip(EVAL_CASES, *ranks):
        one = eval_loss(model, eval_items(n), 0, batch_size, torch.device("cpu"), "fp32")
        assert r0["loss"] == r1["loss"] == pytest.approx(one, rel=1e-6)
        assert r0["forwards"] == r1["forwards"] == math.ceil(n / (2 * batch_size))


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a rank left waiting fails in a minute
    ON_RANKS[sys.argv[1]](*sys.argv[2:])
    gc.collect()  # the FSDP models' reference cycles hold the group: freed now, not at exit, where gloo can abort
    dist.barrier()
    dist.destroy_process_group()
