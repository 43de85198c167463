"""One training step of an E1TM model captured in a CUDA graph and replayed (GraphedStep)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from .layers import e1tm_modules, model_clock
from .ternarize import step


class GraphedStep:
    """One training step's forward, backward and every vote, captured once in a CUDA graph and replayed.

    ``loss = step(x, y)`` copies the inputs into the graph's static buffers, replays forward + backward
    (the votes are kernels in the graph, adding their counts to ``Clock.device_counts``), then runs
    :func:`step` (one sync: the counts, NaN/inf check, step_counter += 1). Python runs once per step
    instead of once per layer, which is where an eager step on a GPU spends most of its time.

    Valid while every kernel argument is fixed: the carry and flip rules (``Xi = corr_accum/(K*gs)``
    does not depend on the step; average's does) and one value of ``Clock.fuse_phase`` (the step is
    captured again when it changes). Building it runs two warm-up steps whose state changes are undone.

    Parameters
    ----------
    model : module with E1TM layers on one CUDA device.
    loss_fn : callable(*inputs) -> scalar loss tensor (runs inside ``autocast``).
    example_inputs : CUDA tensors of the shapes and dtypes every later call passes.
    autocast_dtype : dtype of ``torch.autocast`` around the forward, or None for none.
    """

    def __init__(self, model: nn.Module, loss_fn, *example_inputs: torch.Tensor,
                 autocast_dtype: torch.dtype | None = torch.bfloat16):
        self.model, self.loss_fn, self.clock = model, loss_fn, model_clock(model)
        if not graphable(model):
            raise ConfigError(f"a CUDA graph step needs the carry or flip rule and E1TM state on a GPU; "
                              f"this model has rule {self.clock.scheme.rule!r} on {self._device()}")
        self.autocast_dtype = autocast_dtype
        self.static = [x.detach().clone() for x in example_inputs]
        self._capture()

    def _device(self) -> torch.device:
        return next(iter(e1tm_modules(self.model).values())).T_packed.device

    def _body(self) -> torch.Tensor:
        on = self.autocast_dtype is not None
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16, enabled=on, cache_enabled=False):
            loss = self.loss_fn(*self.static)
        loss.backward()
        return loss.detach()

    def _capture(self) -> None:
        clock, device = self.clock, self._device()
        saved = {(n, k): v.clone() for n, m in e1tm_modules(self.model).items() for k, v in m.named_buffers()}
        saved_clock = (clock.step_counter, dict(clock.stats))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuBLAS handles, Clock.device_counts
                self._body()
                step(self.model)
        torch.cuda.current_stream(device).wait_stream(side)
        mods = e1tm_modules(self.model)
        with torch.no_grad():  # undo the warm-up steps: the run continues from the state it had
            for (n, k), v in saved.items():
                getattr(mods[n], k).copy_(v)
        clock.step_counter, clock.stats = saved_clock[0], saved_clock[1]
        from . import cuda  # triton: imported only when a GPU step is captured

        cuda.write_sched(clock)
        self.fuse_phase = clock.fuse_phase
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.clock.fuse_phase != self.fuse_phase:  # the fuse phase began: capture it anew
            self.graph.reset()
            self._capture()
        for s, x in zip(self.static, inputs, strict=True):
            s.copy_(x, non_blocking=True)
        self.graph.replay()
        step(self.model)
        return self.loss


def graphable(model: nn.Module) -> bool:
    """Whether :class:`GraphedStep` can capture ``model``'s step: E1TM layers on CUDA, rule carry or flip."""
    mods = e1tm_modules(model)
    clock = model_clock(model)
    on_cuda = all(m.T_packed.is_cuda for m in mods.values())
    return on_cuda and clock.scheme.xi_ratio(1) == clock.scheme.xi_ratio(2)
