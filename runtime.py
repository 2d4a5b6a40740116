"""The process every script runs in: one-line errors, atomic files, device and dtype, and torchrun's process group.

This file sits at the bottom of the import graph (model.py and data.py import it; it imports neither), so
training, evaluation and distillation all take their plumbing from one place:

    runtime  <-  model, data  <-  generate, losses, checkpoints, train  <-  sft, evaluate, weights, schedule
             <-  distill  <-  experiment

Data parallelism (the paper's 8B teacher needs more than one 80 GB card to fine-tune). Under `torchrun
--nproc_per_node N` every script that trains or scores runs with FSDP2: each decoder layer and the root are
`fully_shard` units, CUDA uses NCCL with bf16 parameters and compute and fp32 gradient reduction, the CPU uses
gloo (the tests run it that way). Without torchrun there is no process group and nothing here changes the code path:
`world() == 1`, `shard()` returns the model untouched, the reductions return their input.

A checkpoint is sharded as it is loaded: model.load_model builds the model on the meta device, `shard()` wraps it
there, and each rank reads only its own rows of every tensor. Validation losses are split over the ranks
(train.eval_loss); the evaluations that decode run whole on every rank, because a sharded model's decoding runs as
many forwards as its longest answer needs, and every forward is a collective.

The loss of a step stays (sum over the global batch) / (global answer-token count): each rank sums over its part,
divides by the all-reduced count, and the gradients are summed across ranks (not FSDP's default mean), so N ranks of
batch b give the gradients of one process of batch N*b.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# errors and the command line


class UserError(Exception):
    """Bad input from the user: reported as one line, no traceback."""


def run_cli(main):
    """Run a script's main(); a UserError becomes one `error: ...` line on stderr and exit code 2. Under torchrun
    every rank checks the same inputs and fails alike, so rank 0 alone says it."""
    try:
        main()
    except UserError as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            import gc
            gc.collect()  # FSDP modules still alive at teardown can make gloo abort the process at exit
            dist.destroy_process_group()


def given_flags(p: argparse.ArgumentParser, argv=None) -> set[str]:
    """The dests of the flags written on the command line, told apart from defaults: argparse fills a default only
    where the namespace has no value yet, so a namespace pre-filled with a sentinel keeps it for every flag not
    given."""
    unset = object()
    ns = argparse.Namespace(**{k: unset for k in vars(p.parse_args(argv))})
    return {k for k, v in vars(p.parse_args(argv, namespace=ns)).items() if v is not unset}


def refuse_unused(given: set[str], unused: dict[str, str]):
    """One error line for the first flag given that this run would ignore. `unused` maps a dest to the reason."""
    for dest, why in unused.items():
        if dest in given:
            raise UserError(f"--{dest.replace('_', '-')}: {why}")

# -----------------------------------------------------------------------------
# files: read with a clear error, write whole or not at all


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


@contextmanager
def atomic_dir(path):
    """Yield a temp dir beside `path`; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model dir
        if path.exists():  # replacing a finished dir: move it aside first, then drop it
            old = tmp.with_name(tmp.name + "-old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """safetensors file written to a temp name beside `path`, then renamed onto it: never seen half-written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir_all(path):
    """atomic_dir for a dir that every rank writes into (a sharded checkpoint): rank 0 makes the temp dir and, once
    every rank has finished its part, renames it. In one process it is atomic_dir."""
    if not dist.is_initialized():
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if is_main():
        with atomic_dir(path) as tmp:
            broadcast_object(str(tmp))
            yield tmp
            barrier()  # every rank's shard is on disk before the rename
        barrier()
    else:
        tmp = Path(broadcast_object(None))
        yield tmp
        barrier()
        barrier()  # the dir has its final name when this rank goes on

# -----------------------------------------------------------------------------
# device, dtype, seeds


def resolve_device(name: str) -> torch.device:
    """--device: auto, cpu, cuda, cuda:N. Under torchrun on CUDA every rank takes its own card (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a torch device") from None
    if device.type == "cuda" and world() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run on real bf16 kernels here: CUDA cards that support it, and CPUs with AVX-512 or Arm
    bf16, where oneDNN has them. Elsewhere a bf16 matmul is emulated, many times slower than fp32."""
    if device.type == "cuda":  # not emulation: a T4 or V100 "supports" bf16 through fp32 kernels
        return torch.cuda.is_bf16_supported(including_emulation=False)
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private; absent means we cannot tell
    return device.type == "cpu" and check is not None and bool(check())


def resolve_dtype(name: str, device: torch.device) -> str:
    """--dtype auto -> bf16 where the hardware has bf16 matmuls, else fp32. An explicit bf16 is kept, with a warning
    where it will be slow."""
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if name == "bf16" and not fast_bf16(device) and rank() == 0:
        print(f"warning: --dtype bf16 on {device}, which has no bf16 matmul kernels: expect it to be many times "
              f"slower than fp32 (--dtype auto picks fp32 here)", file=sys.stderr)
    return name


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for --dtype bf16 in one process. Under FSDP on CUDA the mixed-precision policy casts the
    parameters instead, and autocast adds the fp32 ops (softmax, norms) it would anyway."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

# -----------------------------------------------------------------------------
# torchrun: process group, FSDP2 units, reductions


def world() -> int:
    """Ranks in this run: torchrun's WORLD_SIZE, 1 without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, logs and writes shared files."""
    return rank() == 0


def init_distributed(device: torch.device):
    """Start the process group when launched by torchrun with more than one rank: NCCL for CUDA tensors, gloo for
    the CPU ones (the token counts and per-sample losses the scripts reduce), gloo alone on the CPU.

    The timeout is long because some work runs on rank 0 alone while the others wait in a barrier (building the
    probe cache, scoring the SFT student for AW, the final evaluation); NCCL's default would kill them at 10 min."""
    if world() > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, timeout=timedelta(hours=3))


def single_process(script: str):
    """Refuse a launch by torchrun for a script that runs in one process (N copies would write the same files)."""
    if world() > 1:
        raise UserError(f"{script} runs in one process: start it with python, not torchrun (sft.py, weights.py and "
                        "distill.py are the ones that run on several ranks)")


@contextmanager
def only_one_in(path: Path, script: str):
    """Hold path/.lock for the block: a second invocation on the same dir is refused in one line instead of
    overwriting the first's live runs."""
    import fcntl  # POSIX, as torchrun is

    Path(path).mkdir(parents=True, exist_ok=True)
    with open(Path(path) / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{path}: another {script} is running on it; wait for it to end, or give another --out") \
                from None
        yield


def print0(*args, **kwargs):
    """print on rank 0 only (tqdm.write's place while a bar is open: tqdm moves its bar below the line)."""
    if is_main():
        from tqdm import tqdm

        tqdm.write(" ".join(map(str, args)), **kwargs)


def main_first(fn, *args):
    """fn(*args) on rank 0 alone (it writes files every rank shares, or decides for all); every rank gets its
    result, or raises the same UserError. In one process, fn(*args)."""
    if not dist.is_initialized():
        return fn(*args)
    result = error = None
    if is_main():
        try:
            result = fn(*args)
        except UserError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (x itself in one process). x is not changed."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def sum_int(n: int) -> int:
    return int(all_reduce_sum(torch.tensor(n, dtype=torch.long)).item()) if dist.is_initialized() else n


def sum_float(x: float) -> float:
    return float(all_reduce_sum(torch.tensor(x, dtype=torch.float64))) if dist.is_initialized() else x


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (a decision, so all ranks take the same branch)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(model: torch.nn.Module, device: torch.device, dtype: str = "fp32", train: bool = True,
          reshard: bool = True):
    """Wrap each decoder layer and the root in FSDP2 units (nothing in one process).

    The root unit (embeddings, final norm, lm_head; tied or not) is not resharded after forward: the training
    scripts call the model's head on answer positions after `hidden()`, and in chunks inside the loss's backward, so
    it must stay gathered from forward to backward. A teacher (train=False) reshards every layer after its forward
    when `reshard`, so a rank holds 1/N of it plus one layer at a time. Gradients are summed over ranks, not averaged:
    each rank's loss is already divided by the global token count. With --dtype bf16 on CUDA the parameters are
    gathered and computed in bf16, the gradients reduced in fp32 (MixedPrecisionPolicy); otherwise in their own
    dtype."""
    if world() == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" and dtype == "bf16" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden")  # the scripts call hidden(), not forward()
    if train:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU: gathered from every rank under FSDP (all ranks must call it; rank 0
    gets the tensors, the others an empty dict), the model's own tensors in one process."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_state_dict(model: torch.nn.Module) -> dict:
    """This rank's shards of the model's state dict (DTensors), for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def load_sharded_state_dict(model: torch.nn.Module, state: dict):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state)


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s total norm as a float: under FSDP it is a DTensor over the shards."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
