"""Torch glue for E1TM: layers whose only state is integer buffers, and whole-model operations.

- :mod:`.layers` E1TMLinear / E1TMEmbedding / E1TMMultiheadAttention (and the tied variants), their autograd
  Functions and the shared Clock
- :mod:`.custom_ops` materialize and vote as torch.library custom ops (``arbs::materialize``, ``arbs::vote``)
- :mod:`.ternarize` ternarize_, step, accumulate, micro_batches, data_parallel, the fuse phase, state in and out, save / load_ a whole model
- :mod:`.cuda` what the Triton kernels need from a layer; :mod:`.cuda_graph` GraphedStep
- :mod:`.baselines` float-latent ternary baselines (absmean STE, LSQ, ...) for comparison
"""

from .cuda_graph import GraphedStep, graphable
from .layers import (
    Clock,
    E1TMEmbedding,
    E1TMLinear,
    E1TMMultiheadAttention,
    E1TMTiedEmbedding,
    E1TMTiedLinear,
    E1TMWeight,
    e1tm_modules,
    model_clock,
)
from .ternarize import (
    accumulate,
    check_ranks,
    data_parallel,
    enter_fuse_phase_,
    float_parameters,
    load_,
    load_tensor_states,
    micro_batches,
    save,
    state_digest,
    step,
    tensor_states,
    ternarize_,
)

__all__ = [
    "Clock", "E1TMEmbedding", "E1TMLinear", "E1TMMultiheadAttention", "E1TMTiedEmbedding", "E1TMTiedLinear",
    "E1TMWeight", "GraphedStep", "accumulate", "check_ranks", "data_parallel", "e1tm_modules", "enter_fuse_phase_", "float_parameters", "graphable",
    "load_", "load_tensor_states", "micro_batches", "model_clock", "save", "state_digest", "step", "tensor_states", "ternarize_",
]
