"""The lean decode runtime: the architecture table, one layer loop for prefill, decode and verification, and the
``generate`` binding. The optimizers plug into it through these public names; none reads another's private state.

- :func:`build_arch` reads a ``transformers`` model into an :class:`Arch` (the optimizer may swap its linears);
- :class:`StaticDecoder` runs it over a preallocated KV cache, or over an :class:`AttendingCache`;
- :class:`NativeLinear` is how a linear offers itself to the fused native layer;
- :func:`attach_decoder` / :func:`decoder_of` put a decoder on a model and find it again;
- :func:`bind_generate` gives the model instance a ``generate`` that runs the lean loop.
"""

from ryzen_opt.runtime.arch import (
    SUPPORTED_MODEL_TYPES,
    Arch,
    Concat,
    Layer,
    UnsupportedModelError,
    build_arch,
    is_conv1d,
    linear_params,
    model_type,
)
from ryzen_opt.runtime.decoder import (
    AttendingCache,
    NativeAttendingCache,
    NativeLayer,
    NativeLinear,
    NativeSpec,
    StaticDecoder,
    attach_decoder,
    attends_on_storage,
    decoder_of,
    native_plan,
)
from ryzen_opt.runtime.generate import bind_generate, lean_generate, why_not_served

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Arch",
    "AttendingCache",
    "Concat",
    "NativeAttendingCache",
    "Layer",
    "NativeLayer",
    "NativeLinear",
    "NativeSpec",
    "StaticDecoder",
    "UnsupportedModelError",
    "attach_decoder",
    "attends_on_storage",
    "bind_generate",
    "build_arch",
    "decoder_of",
    "is_conv1d",
    "lean_generate",
    "linear_params",
    "model_type",
    "native_plan",
    "why_not_served",
]
