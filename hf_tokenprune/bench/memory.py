"""Peak tensor memory of a call on any device, CPU included (torch keeps no allocator statistics for the CPU).

:class:`TensorMemory` is a ``TorchDispatchMode`` that sees every tensor an ATen op returns, counts the bytes of
each distinct storage from the op that creates it until the last tensor using it is freed, and keeps the peak.
Tensors that exist before the block (weights, the inputs) are not counted: the figure is the working memory of
the call (activations, KV cache, logits). It slows the call down: measure memory in its own, untimed run.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """``with TensorMemory() as mem: ...`` then ``mem.peak`` (bytes): the most bytes held at once by storages
    created inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage data pointer -> [bytes, tensors alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not key:
            return
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]
