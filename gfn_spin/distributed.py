"""Data-parallel plumbing for the α-SPIN trainer: the few collectives it needs, via accelerate.

Works unchanged in one process (every operation is then a no-op) and under ``accelerate launch``
with several GPUs or CPU processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Distributed:
    """The few collective operations the trainer needs; a no-op in a single process.

    Built from ``accelerate.PartialState`` (which reads the ``accelerate launch`` environment
    and starts the process group, gloo on CPU). Not DDP: iterates are adapter *views* of one
    shared model, so the trainer sums gradients itself after each step.
    """

    def __init__(self, device: str | None = None) -> None:
        from accelerate import PartialState

        # cpu=True makes accelerate use gloo when the launcher started several CPU processes
        # (torchrun-style LOCAL_RANK/WORLD_SIZE); otherwise it would ignore them without CUDA.
        cpu = (device is not None and torch.device(device).type == "cpu") or not (
            torch.cuda.is_available()
        )
        self.state = PartialState(cpu=cpu)
        self.rank = self.state.process_index
        self.size = self.state.num_processes
        self.is_main = self.state.is_main_process

    @property
    def device(self) -> torch.device:
        return self.state.device

    def barrier(self) -> None:
        if self.size > 1:
            self.state.wait_for_everyone()

    def gather_objects(self, value: Any) -> list[Any]:
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any) -> Any:
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for param, grad in zip(parameters, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
            offset += grad.numel()
