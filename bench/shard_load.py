"""Loading a checkpoint on 2 torchrun ranks: each rank reading the whole of it and then keeping its FSDP2 shards (the
load before sharded loading), against each rank reading only its own rows on the meta-built, already sharded model
(model.load_model with `shard`, as sft.py, distill.py and the sharded teachers do).

    python bench/shard_load.py                                  # models/teacher (SmolLM2-135M, fp32), 2 ranks
    python bench/shard_load.py --dtype bf16 --rounds 3          # kept in bf16, as a torchrun --dtype bf16 teacher

Each way runs in fresh processes (`torchrun --nproc_per_node 2` of this file), so each rank's peak resident set
(getrusage's ru_maxrss: anonymous memory and the mmapped file pages it touched) is that load's own. Per rank it
reports the resident set before the load, the peak during it, and the load's wall time (from a barrier before to a
barrier after, so the slower rank counts). The file is read once before the first round, so both ways read it from
the page cache. Ratios are sharded / whole; with several --rounds the ways alternate and the medians are compared.
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import runtime  # noqa: E402
from model import checkpoint_files, load_model  # noqa: E402

WAYS = ("whole", "sharded")
MiB = 2**20


def rss_mib() -> float:
    """This process's resident set now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load(way: str, path: str, dtype: torch.dtype):
    """A stage's teacher as CheckpointTeachers loads it under torchrun: frozen, FSDP2 units, this rank's shards."""
    device = torch.device("cpu")

    def shard(model):
        return runtime.shard(model.requires_grad_(False), device, "fp32", train=False)

    if way == "whole":
        return shard(load_model(path, device=device, dtype=dtype))
    return load_model(path, device=device, dtype=dtype, shard=shard)


def rank_main(way: str, path: str, dtype: str, out: str):
    """One rank of one way: load, then rank 0 writes every rank's figures to `out`."""
    runtime.init_distributed(torch.device("cpu"))
    before = rss_mib()
    runtime.barrier()
    t0 = time.perf_counter()
    model = load(way, path, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
    runtime.barrier()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / MiB
    rows = [None] * runtime.world()
    torch.distributed.all_gather_object(rows, {"rank": runtime.rank(), "before_mib": before, "peak_mib": peak,
                                               "seconds": seconds, "shards_mib": local})
    if runtime.is_main():
        Path(out).write_text(json.dumps(rows) + "\n")
    del model
    gc.collect()  # the FSDP model's reference cycles hold the group: freed now, not at exit, where gloo can abort
    runtime.barrier()
    torch.distributed.destroy_process_group()


def launch(way: str, path: str, dtype: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--rank-of", way, "--checkpoint", path, "--dtype", dtype, "--out", str(out)]
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{way} load failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
        return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "models" / "teacher"), help="HF Llama model dir to load")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the dtype the weights are kept in")
    p.add_argument("--ranks", type=int, default=2, help="torchrun ranks")
    p.add_argument("--rounds", type=int, default=1, help="loads of each way, alternating")
    p.add_argument("--rank-of", choices=WAYS, default=None, help=argparse.SUPPRESS)  # set when run as a rank
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_of:
        return rank_main(args.rank_of, args.checkpoint, args.dtype, args.out)

    files = checkpoint_files(Path(args.checkpoint))
    size = sum(f.stat().st_size for f in files) / MiB
    for f in files:  # into the page cache, so neither way pays the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    print(f"{args.checkpoint}: {size:.0f} MiB in {len(files)} file(s), kept in {args.dtype}, {args.ranks} ranks, "
          f"{args.rounds} round(s)")
    results = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            results[way].append(launch(way, args.checkpoint, args.dtype, args.ranks))
    print(f"\n{'way':<8} {'rank':>4} {'before MiB':>11} {'peak MiB':>9} {'peak - before':>14} {'shards MiB':>11} "
          f"{'load s':>7}")
    summary = {}
    for way in WAYS:
        for r in range(args.ranks):
            peak = statistics.median(rows[r]["peak_mib"] for rows in results[way])
            before = statistics.median(rows[r]["before_mib"] for rows in results[way])
            seconds = statistics.median(rows[r]["seconds"] for rows in results[way])
            shards = results[way][0][r]["shards_mib"]
            summary[way, r] = peak, peak - before, seconds
            print(f"{way:<8} {r:>4} {before:11.0f} {peak:9.0f} {peak - before:14.0f} {shards:11.1f} {seconds:7.2f}")
    print()
    for r in range(args.ranks):
        (pw, gw, tw), (ps, gs, ts) = summary["whole", r], summary["sharded", r]
        print(f"rank {r}: sharded / whole: peak RSS {ps / pw:.2f}x, peak - before {gs / gw:.2f}x, "
              f"load time {ts / tw:.2f}x")


if __name__ == "__main__":
    main()
