"""Which processes a label / training job runs on: ``accelerate`` state, CPU processes (gloo) when no GPU-like
device exists, so ranks started by torchrun / ``accelerate launch --multi_gpu`` on a CPU machine cooperate
instead of each running alone as rank 0 of 1."""

from __future__ import annotations

import os
from typing import Any

import torch


def cpu_only() -> bool:
    """True when ``ACCELERATE_USE_CPU`` is set or there is no accelerator device."""
    accelerator = getattr(torch, "accelerator", None)
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not available


def process_state() -> Any:
    """``accelerate.PartialState`` (see :func:`cpu_only`); raises if processes were launched but accelerate set
    none of them up as distributed (each would do all the work)."""
    from accelerate import PartialState
    from accelerate.utils import get_int_from_env

    state = PartialState(cpu=cpu_only())
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if state.num_processes == 1 and launched > 1:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up none of them as distributed; "
                           "each would do all the work")
    return state


def end_processes(state: Any) -> None:
    """Let every process of ``state`` (:func:`process_state`) arrive, then end its process group: a gloo group left
    to the interpreter's exit can abort a rank ("terminate called without an active exception")."""
    state.wait_for_everyone()
    state.destroy_process_group()
