"""What every benchmark shares: the thread count flag (bench/ scripts are run as `python bench/NAME.py`)."""

import torch


def add_threads_arg(p):
    p.add_argument("--threads", type=int, default=1, help="torch threads, 0 = torch's default (all cores). 1 because "
                                                          "on 2 cores shared with a training run a second thread "
                                                          "mostly waits for a time slice")


def set_threads(n: int):
    if n:
        torch.set_num_threads(n)


def timed_rounds(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Each of `runs` (name -> function) once untimed, then `rounds` times in turn, so load from other processes on
    the machine hits them alike: the seconds of every call, by name."""
    import time

    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times
