"""Where the teacher's checkpoints are saved: the footsteps SCD walks the student along (arXiv 2601.10114, Sec. 3.2).

The paper spaces them evenly. Not a choice it discusses, and here beside it: geometric spacing (dense early, where the
teacher moves most) and val_loss spacing (at equal shares of the validation loss's drop, chosen at the end of the run
from candidates saved along the way). subset_steps picks n of a run's saved steps by the same rules, for SCD's
candidate count.
"""

import math
import shutil
from pathlib import Path

from runtime import UserError

SPACINGS = ("even", "geometric", "val_loss")  # the paper: even


class Footsteps:
    """The save plan of one SFT run of `total` steps with n checkpoints: which steps save, which of them need the
    full validation (the task metric) and which only the val loss, and the pruning at the end."""

    def __init__(self, spacing: str, total: int, n: int, save_every: int = 0, eval_every: int = 0):
        self.spacing, self.total, self.n = spacing, total, n
        if spacing == "val_loss":  # every eval step saves a candidate; the footsteps are chosen from them at the end
            self.eval_every = eval_every or math.ceil(total / (4 * n))
            self.save_at = set(even_steps(total, self.eval_every))
        else:
            self.eval_every = 0
            self.save_at = set(spaced_steps(spacing, total, n, save_every))

    @property
    def needs_start_loss(self) -> bool:
        """val_loss spacing measures the drop from the loss at step 0."""
        return self.spacing == "val_loss"

    def candidate_only(self, step: int) -> bool:
        """A val_loss candidate before the final step: its val loss decides, a generated validation would only cost."""
        return self.spacing == "val_loss" and step < self.total

    def final_at(self, step: int) -> int | None:
        """The step to record as final in the index when `step` saves (with val_loss spacing: only once pruned)."""
        return step if step == self.total and self.spacing != "val_loss" else None

    def finish(self, out: Path, curve: dict[int, float], checkpoints: list[tuple[int, Path]]) -> dict:
        """The end of the run: with val_loss spacing drop the candidates that are no footstep. Returns what the
        checkpoint index records of the spacing."""
        if self.spacing == "val_loss":
            keep = val_loss_steps(curve, self.n)
            for s, path in checkpoints:
                if s not in keep:  # renamed first, so a kill mid-delete leaves no half checkpoint under a step name
                    tmp = Path(out) / f".tmp-drop-{path.name}"
                    path.rename(tmp)
                    shutil.rmtree(tmp)
            return {"spacing": "val_loss", "eval_every": self.eval_every,
                    "val_curve": {str(k): v for k, v in curve.items()}}
        return {} if self.spacing == "even" else {"spacing": self.spacing}


def even_steps(total: int, every: int) -> list[int]:
    """The paper's footsteps: every `every` optimiser steps, and the final step."""
    return sorted({*range(every, total + 1, every), total})


def geometric_steps(total: int, n: int) -> list[int]:
    """n footsteps dense early, where the teacher moves most: step_k = round(total^(k/n)) for k = 1..n, a geometric
    sequence of ratio total^(1/n) that ends on the final step. Steps that round onto the previous one move up by
    one (and never past total − (n − k), so the final step stays last): n distinct steps in [1, total].
    For total 100, n 4: 3, 10, 32, 100."""
    if not 1 <= n <= total:
        raise UserError(f"--checkpoints {n}: geometric spacing needs 1 to {total} (the run's steps) checkpoints")
    out = []
    for k in range(1, n + 1):
        s = max(round(total ** (k / n)), out[-1] + 1 if out else 1)
        out.append(min(s, total - (n - k)))
    return out


def val_loss_steps(curve: dict[int, float], n: int) -> list[int]:
    """Footsteps at equal shares of the validation loss's drop. curve maps steps to val loss, step 0 the start.

    With L0 the loss at step 0 and Lmin the lowest on the curve, level k (k = 1..n) is L0 − k/n · (L0 − Lmin); its
    footstep is the first step whose loss reaches it, so level n is the best step. The final step is always kept
    as well. Levels crossed within one interval of the curve share a step, so there can be fewer than n (+1)."""
    steps = sorted(curve)
    l0, lmin = curve[steps[0]], min(curve[s] for s in steps[1:])
    keep = {steps[-1]}
    if lmin < l0:  # a loss that never fell below its start has no shares to place: only the final step
        for k in range(1, n + 1):
            level = lmin if k == n else l0 - k / n * (l0 - lmin)  # exactly Lmin at k = n, whatever the rounding
            keep.add(next(s for s in steps[1:] if curve[s] <= level))
    return sorted(keep)


def spaced_steps(spacing: str, total: int, n: int, save_every: int = 0) -> list[int]:
    """The save steps of an even or geometric run (val_loss spacing decides from the curve: val_loss_steps)."""
    if spacing == "geometric":
        return geometric_steps(total, n)
    return even_steps(total, save_every or math.ceil(total / n))


def subset_steps(steps: list[int], n: int, spacing: str) -> list[int]:
    """n of a run's checkpoint steps placed by a spacing rule on its final step T: for each target (even: k·T/n,
    rounded; geometric: geometric_steps(T, n)), the nearest saved step (the earlier on a tie). The final step is always
    one of them. Refused when two targets land on one saved step: the run is too coarse for n."""
    if not 1 <= n <= len(steps):
        raise UserError(f"--candidates {n}: the teacher run has {len(steps)} checkpoints ({steps})")
    total = steps[-1]
    targets = geometric_steps(total, n) if spacing == "geometric" else [round(k * total / n) for k in range(1, n + 1)]
    chosen = [min(steps, key=lambda s: (abs(s - t), s)) for t in targets]
    if len(set(chosen)) < n:
        raise UserError(f"--candidates {n} --candidate-spacing {spacing}: targets {targets} fall on the teacher's "
                        f"checkpoints {chosen}, fewer than {n} distinct ones; its run saved too few ({steps})")
    return chosen
