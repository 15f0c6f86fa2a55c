"""Data-parallel training over several processes (one machine or several) with ``torch.distributed``.

Every process holds a whole copy of the model and reads its own share of each minibatch;
:func:`pyro_sc.infer.fit` finds the process group and, at every step, averages the gradients of all
processes (weighted by their numbers of cells), so all copies take the same Adam step. Launch the same
script once per process with ``torchrun``::

    torchrun --nproc_per_node=4 train.py              # one machine, 4 processes (e.g. 4 GPUs)

    # train.py
    import anndata, pyro_sc
    pyro_sc.distributed.init_process_group()          # NCCL on GPUs, gloo on CPUs
    adata = anndata.read_h5ad("atlas.h5ad", backed="r")
    model = pyro_sc.SCVI(adata)
    model.train(device="cuda")                        # each process: cuda:<local rank>
    if pyro_sc.distributed.is_main_process():
        model.save("scvi.pt")

What is shared and what is not:

- ``batch_size`` is the minibatch of all processes together, split evenly among them: a run on N
  processes takes the steps of a 1-process run with the same options (same epochs, learning rate and
  KL warm-up), each step's gradient being the same average over the same cells.
- The minibatch order and the train / validation split come from the seed, identical in every process;
  the parameters and buffers of process 0 are broadcast at the start. Each process then draws its own
  random numbers (latent samples, dropout) from a stream derived from the seed and its rank.
- Batch normalisation normalises with each process's own share of the minibatch (as scVI does with a
  minibatch of that size); its running statistics are averaged over the processes after every epoch.
- The validation loss is summed over the processes' shares of the validation cells; early stopping,
  learning-rate reductions on non-finite values and callbacks' stop requests are decided together.
- Process 0 alone writes checkpoints and shows progress; the user's script writes results from
  :func:`is_main_process` only. ``resume=`` needs the checkpoint readable by every process (a shared
  file system when the processes are on several machines).
- On GPUs, each process's ``device="cuda"`` is its own GPU (``init_process_group`` selects the GPU of
  ``LOCAL_RANK``); batch normalisation is not synchronised across GPUs either.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["get_rank", "get_world_size", "init_process_group", "is_main_process"]


def init_process_group(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` set up (its ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...
    environment variables); return ``(rank, world_size)``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (each process then uses the GPU of its
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. Calling it again in a process that has joined is harmless.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"environment variables {missing} are not set: launch the script with torchrun "
                "(e.g. torchrun --nproc_per_node=2 train.py), or set them yourself"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True in process 0, and in a run without a process group: the process that writes results."""
    return get_rank() == 0


class Replicas:
    """What :func:`pyro_sc.infer.fit` does with the other processes; every method is a no-op (returns
    its input unchanged) in a 1-process run, so the training loop is the same code either way."""

    def __init__(self, distributed: bool | None, device: torch.device):
        initialised = dist.is_available() and dist.is_initialized()
        if distributed and not initialised:
            raise RuntimeError(
                "distributed=True but no torch.distributed process group is initialised: call "
                "pyro_sc.distributed.init_process_group() in a script launched with torchrun"
            )
        self.enabled = bool(initialised and distributed is not False and dist.get_world_size() > 1)
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.device = device

    # ----------------------------------------------------------------------------------- the cells
    def shard(self, batches: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """This process's share of each global minibatch and that share's weight in the average (its
        fraction of the minibatch's cells). A last minibatch too small to give every process two cells
        (batch normalisation needs two) is merged into the one before."""
        if not self.enabled:
            return [(idx, 1.0) for idx in batches]
        batches = list(batches)
        if len(batches) > 1 and len(batches[-1]) < 2 * self.world_size:
            batches[-2:] = [np.concatenate(batches[-2:])]
        out = []
        for idx in batches:
            if len(idx) < 2 * self.world_size:
                raise ValueError(
                    f"a minibatch of {len(idx)} cells cannot give each of {self.world_size} processes two "
                    "cells: raise batch_size (the minibatch of all processes together) or use fewer processes"
                )
            share = np.array_split(idx, self.world_size)[self.rank]
            out.append((share, len(share) / len(idx)))
        return out

    def split(self, indices: np.ndarray) -> np.ndarray:
        """This process's share of ``indices`` (e.g. the validation cells)."""
        return np.array_split(indices, self.world_size)[self.rank] if self.enabled else indices

    # ------------------------------------------------------------------------------ communication
    def agree_on_seed(self, seed: int | None) -> int | None:
        """The seed of process 0 (drawn there when ``seed`` is None), so every process shuffles alike."""
        if not self.enabled:
            return seed
        value = torch.tensor(
            [int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed],
            dtype=torch.long, device=self.device,
        )
        dist.broadcast(value, src=0)
        return int(value.item())

    def process_seed(self, seed: int, epoch: int) -> int | None:
        """A seed for this process's own random numbers (None for process 0, which keeps the run's)."""
        if not self.enabled or self.rank == 0:
            return None
        return int(np.random.SeedSequence([seed, self.rank, epoch]).generate_state(1)[0])

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every process the values of process 0."""
        if self.enabled:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def reduce_gradients(
        self, params: Sequence[torch.Tensor], weight: float, fault: str | None
    ) -> str | None:
        """Replace each process's gradients by the weighted sum over processes (weights: shares of the
        minibatch's cells, summing to one). A fault (non-finite loss) in any process is a fault in all:
        the returned message, the same decision everywhere."""
        if not self.enabled:
            return fault
        used = [p.grad is not None and fault is None for p in params]
        grads = [p.grad * weight if u else torch.zeros_like(p) for p, u in zip(params, used)]
        flags = [float(u) for u in used] + [float(fault is not None)]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(flags, device=self.device)])
        dist.all_reduce(flat)
        *has_grad, faults = flat[-len(params) - 1 :].tolist()
        if faults > 0:
            return fault or "the loss became non-finite in another process"
        offset = 0
        for p, g, used in zip(params, grads, has_grad):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p) if used > 0 else None
            offset += n
        return None

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true in some process."""
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag

    def average_buffers(self, modules: Sequence[torch.nn.Module]) -> None:
        """Average the floating-point buffers (batch-norm running statistics) over the processes."""
        if not self.enabled:
            return
        with torch.no_grad():
            for module in modules:
                for b in module.buffers():
                    if b.is_floating_point():
                        dist.all_reduce(b)
                        b /= self.world_size
