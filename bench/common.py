"""What every benchmark shares: the thread count flag (bench/ scripts are run as `python bench/NAME.py`)."""

import torch


def add_threads_arg(p):
    p.add_argument("--threads", type=int, default=1, help="torch threads, 0 = torch's default (all cores). 1 because "
                                                          "on 2 cores shared with a training run a second thread "
                                                          "mostly waits for a time slice")


def set_threads(n: int):
    if n:
        torch.set_num_threads(n)
