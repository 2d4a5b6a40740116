"""Where the teacher's targets come from during distillation: a teacher checkpoint loaded as a model, one at a time,
whole or sharded over the torchrun ranks. teacher_cache.TeacherCache serves the same interface from cached log-probs.

A teacher source has `get(step)`, which returns the teacher of one checkpoint; a teacher has `targets(batch)`: the
(N, V) distribution at the batch's answer positions and the (N,) CE of its gold tokens (AW's L_ckpt per token), and
`idle(batch)` for a rank's empty share of a batch.
"""

import gc

import torch

import runtime
from losses import token_ce
from model import load_model
from train import answer_logits


class ModelTeacher:
    """A teacher checkpoint as a frozen model: its forward runs on every batch."""

    def __init__(self, model, device, dtype: str):
        self.model, self.device, self.dtype = model, device, dtype

    @torch.no_grad()
    def targets(self, batch: dict):
        """(N, V) fp32 logits at the batch's answer positions, and (N,) the CE of their gold tokens."""
        with runtime.autocast(self.device, self.dtype):
            logits, labels, _ = answer_logits(self.model, batch)  # (N, V), (N,)
        return logits, token_ce(logits, labels)

    def idle(self, batch: dict):
        """A sharded teacher's forward is a collective: every rank runs it, even on a batch of nothing."""
        if runtime.is_sharded(self.model):
            self.targets(batch)


class CheckpointTeachers:
    """Loads the checkpoint a stage asks for, dropping the previous one first, so one teacher is in memory at a time.

    With sharding "shard" (torchrun) each rank reads and keeps 1/N of it and gathers one layer at a time in its
    forward; "replicate" reads and keeps a whole copy on every rank. Under torchrun with --dtype bf16 the teacher is
    kept in bf16: it only runs forward, and FSDP computes in bf16 anyway. One process keeps fp32 weights under
    autocast."""

    def __init__(self, checkpoints: dict, device, dtype: str, sharding: str = "shard"):
        self.checkpoints, self.device, self.dtype, self.sharding = checkpoints, device, dtype, sharding
        self.step, self.teacher = None, None

    def get(self, step: int) -> ModelTeacher:
        if step != self.step:
            self.teacher = None
            gc.collect()  # FSDP's hooks hold the old teacher in a reference cycle: free it before the next loads
            weights = torch.bfloat16 if runtime.world() > 1 and self.dtype == "bf16" else torch.float32
            model = load_model(self.checkpoints[step], device=self.device, dtype=weights,
                               shard=self.frozen_shard if self.sharding == "shard" else None)
            self.step, self.teacher = step, ModelTeacher(model.requires_grad_(False).eval(), self.device, self.dtype)
        return self.teacher

    def frozen_shard(self, model):
        """The teacher's FSDP units, made on the meta device: under torchrun each rank then reads only its shards."""
        return runtime.shard(model.requires_grad_(False).eval(), self.device, self.dtype, train=False)
