"""Training runs of the command line: checkpoints, Ctrl-C, and resuming a run exactly.

A run is ``epochs`` passes over the model file's ``train_data()``, the batches shuffled per epoch
from ``seed`` and the learning rate decayed from ``lr0`` on a cosine (pockc.scoring.fit). Its
progress (``done`` of ``total`` steps) is stored in the saved step's manifest, with the step:
resuming a run skips the steps done and continues with the same batches, learning rates,
optimizer state and generator state, so an interrupted and resumed run ends where the
uninterrupted one does, bit for bit.

A checkpoint is ``OUT/step/`` (the saved step, runtime/artifact.py) and ``OUT/model.safetensors``
(the model's full state dict); each is replaced atomically, so a process killed at any moment
leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass

import torch

from pockc.runtime.fileio import atomic_write
from pockc.runtime.train_step import _DeferInterrupt

STEP_DIR = "step"
WEIGHTS = "model.safetensors"


@dataclass
class Run:
    model_file: str      # absolute path of the model file whose data the run trains on
    model_sha: str       # its sha256 when the run started
    epochs: int
    seed: int
    lr0: float
    total: int           # steps of the run
    done: int = 0        # steps done
    index: int = 0       # 0 for the run of `pockc compile`, then 1, 2, ... for each `pockc train --epochs`

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


class Interrupted(Exception):
    """Ctrl-C during a run: the current step finished and a checkpoint was written."""

    def __init__(self, run: Run, out: str):
        super().__init__(f"interrupted at step {run.done} of {run.total}")
        self.run, self.out = run, out


def file_sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's full state dict as safetensors bytes (``load_state_dict(load_file(...))`` takes
    it back); a tensor under several names (tied weights) is stored once per name."""
    from safetensors.torch import save
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        out[name] = t.clone() if key in seen else t.contiguous()
        seen.add(key)
    return save(out)


def checkpoint(step, out: str, run: Run | None, model: torch.nn.Module | None = None) -> None:
    """Write the weights to OUT/model.safetensors and the step (with the run's progress, its commit
    point last) to OUT/step. A kill between the two leaves weights one checkpoint ahead of the step;
    resuming goes by the step."""
    atomic_write(os.path.join(out, WEIGHTS), state_dict_bytes(model if model is not None else step.model))
    step.save(os.path.join(out, STEP_DIR), extra={"run": run.to_dict() if run is not None else None})


def train(step, batches, run: Run, out: str, *, save_every: int = 0, progress=None, model=None) -> list:
    """Continue ``run`` on ``step`` to its end; returns the losses of the steps run now. Every
    ``save_every`` steps a checkpoint is written; Ctrl-C writes one after the current step and
    raises :class:`Interrupted`."""
    from pockc.scoring import fit

    base = step.step_count - run.done            # the step's count when the run started
    step.optimizer.lr = run.lr0
    if run.done:        # resumed: dropout draws continue from the checkpoint (evaluating since drew too)
        from pockc.runtime.artifact import restore_rng_state
        restore_rng_state(step)

    def on_step(done, loss):
        run.done = done
        if save_every and done % save_every == 0 and done < run.total and math.isfinite(loss):
            checkpoint(step, out, run, model)

    try:
        return fit(step, batches, run.epochs, run.seed, start=run.done, on_step=on_step, progress=progress,
                   stop_nonfinite=True)
    except KeyboardInterrupt:
        run.done = step.step_count - base       # a step interrupted by Ctrl-C finishes first
        with _DeferInterrupt():                  # a second Ctrl-C while writing: the write is atomic anyway
            checkpoint(step, out, run, model)
        raise Interrupted(run, out) from None
