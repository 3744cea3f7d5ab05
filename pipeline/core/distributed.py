"""Several processes, GPUs or machines with PyTorch's own engine (torchrun), not a scheduler of ours.

* :class:`LauncherParams` (``launcher`` section): how ``dvc repro`` runs ``features`` and
  ``finetune``. With ``nproc_per_node`` x ``nnodes`` > 1 the CLI re-executes the same command
  under ``torchrun`` (``python -m torch.distributed.run``); a command already started by
  torchrun (``LOCAL_RANK`` set) just runs.
* :func:`context`: the process group for this run, from torchrun's environment. ``gloo`` on
  CPUs, ``nccl`` on GPUs (``launcher.backend: auto``); a plain single process gets a context
  with ``world_size == 1`` and no process group.

Outputs are written by rank 0 only, atomically; the ranks meet at barriers. Multi-node runs
need the workspace (``data/``, ``models/``) on a filesystem all nodes see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from .config import LauncherParams
from .errors import PipelineError


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(params: LauncherParams, stage_args: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc-per-node={params.nproc_per_node}", f"--nnodes={params.nnodes}"]
    if params.nnodes > 1:
        cmd += [f"--rdzv-backend={params.rdzv_backend}",
                f"--rdzv-endpoint={params.rdzv_endpoint}", f"--rdzv-id={params.rdzv_id}"]
        if params.rdzv_backend == "static":
            cmd += [f"--node-rank={params.node_rank}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "pipeline", *stage_args]


def relaunch(params: LauncherParams, stage_args: Sequence[str] | None = None) -> int | None:
    """Run the stage under torchrun when params ask for it, with this command's own arguments
    (``sys.argv[1:]``, or ``stage_args``); None when this process should run it."""
    if not params.distributed or under_torchrun():
        return None
    return subprocess.call(torchrun_command(params, sys.argv[1:] if stage_args is None
                                            else stage_args))


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def context(device: str = "cpu", backend: str = "auto") -> DistContext:
    """The process group of this torchrun run (or a single-process context)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch
    import torch.distributed as dist

    chosen = backend if backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if chosen == "nccl" and not torch.cuda.is_available():
        raise PipelineError("launcher.backend nccl needs CUDA GPUs; use gloo (or auto) on CPUs")
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, backend=chosen)
