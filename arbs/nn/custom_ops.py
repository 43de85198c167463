"""An E1TM layer's two kernels as ``torch.library`` custom ops, so ``torch.compile`` captures E1TM layers whole.

- ``arbs::materialize(Tensor[] state, int key, int[] shape, ScalarType dtype) -> Tensor``: W_eff of layer
  ``key`` from its integer ``state`` (the arrays of ``scheme.arrays()``, in that order), in ``dtype`` and the
  logical ``shape``: a fresh tensor. Pure (``mutates_args=()``); its fake implementation gives the shape and
  dtype without running a kernel.
- ``arbs::vote(Tensor grad, Tensor(a!)[] state, int key) -> ()``: hands one use's weight gradient to
  layer ``key``; at the layer's last pending use of the step (and outside ``accumulate``) the layer votes on
  the summed gradient, which mutates ``state`` in place (declared in ``mutates_args``).

The layers call these ops only while dynamo traces them (``torch.compiler.is_compiling()``); in eager mode
they call the same implementations directly, without the dispatcher's cost. Dynamo never traces inside a
custom op, so the numpy/numba and Triton dispatch below stays out of the graph.

What is not a tensor reaches the implementations through ``key``: an int naming the layer in a registry of
live E1TM layers (its clock gives the scheme, ``step_counter``, the seed and the fuse phase at run time, so a
compiled graph stays valid across steps). The implementations act on the tensors they are given, not on the
layer's buffers, so they stay correct when a compiler passes copies (functionalization).
"""

from __future__ import annotations

import itertools
import weakref

import torch

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count(1)


def register(layer) -> int:
    """A fresh key for ``layer`` (an E1TMWeight), valid while the layer lives."""
    key = next(_NEXT_KEY)
    _LAYERS[key] = layer
    return key


def layer_for(key: int):
    try:
        return _LAYERS[key]
    except KeyError:
        raise RuntimeError(f"arbs custom op: no live E1TM layer has key {key}") from None


@torch.library.custom_op("arbs::materialize", mutates_args=())
def materialize(state: list[torch.Tensor], key: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """W_eff of layer ``key`` from ``state``, in ``dtype`` (a fresh tensor of ``shape``)."""
    return layer_for(key).materialize(dtype, state=state)


@materialize.register_fake
def _materialize_fake(state, key, shape, dtype):
    return state[0].new_empty(shape, dtype=dtype)


@torch.library.custom_op("arbs::vote", mutates_args=("state",))
def vote(grad: torch.Tensor, state: list[torch.Tensor], key: int) -> None:
    """One use's gradient of W_eff for layer ``key``: summed with the step's other uses; at the last one the
    layer votes on the sum, updating ``state`` in place."""
    # a compiled graph may reuse grad's memory after this call: keep a copy if the vote is deferred
    layer_for(key).receive_grad(grad, state=state, borrowed=True)


@vote.register_fake
def _vote_fake(grad, state, key):
    return None
