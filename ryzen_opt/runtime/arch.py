"""The architecture table: how the lean runtime reads a ``transformers`` decoder-only model.

A model is reduced to an :class:`Arch`: its embedding, its layers as :class:`Layer` records (two norms, a fused
q|k|v projection, o, the MLP's input projection(s) and down projection, the activation and the attention scale),
its final norm, LM head and rotary embedding. The records hold the model's own modules, never copies, so an
optimizer that swaps a linear for a quantized one changes what the runtime reads and nothing else.

:func:`build_arch` knows where each family keeps these modules. It asks the caller to ``replace`` each group of
linears (the KernelOptimizer hands back its quantized, possibly fused, modules); with the default, :func:`keep`, it
reads a model as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ryzen_opt.errors import RyzenOptError

# model_type values the runtime runs, by family: "llama" (RMSNorm, RoPE, SiLU-gated MLP, GQA) or "gpt2".
FAMILIES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


class UnsupportedModelError(RyzenOptError, TypeError):
    """The model's architecture is not one the lean runtime knows how to run."""


@dataclass
class Layer:
    """One decoder layer, as the lean loop sees it (modules shared with the HF tree, never copied)."""

    norm1: nn.Module
    norm2: nn.Module
    qkv: nn.Module  # fused [q | k | v] projection, or a module returning the concatenation
    o: nn.Module
    mlp_in: nn.Module  # llama: fused [gate | up]; gpt2: c_fc
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    scale: float


@dataclass
class Arch:
    """A decoder-only model reduced to what one forward needs."""

    kind: str  # the family: "llama" or "gpt2"
    layers: list[Layer]
    embed: nn.Module
    pos_embed: nn.Module | None
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float
    max_positions: int
    sliding_window: int | None


# replace(parent, names, label, fusable) -> the module the lean loop calls for those linears of ``parent``
# (their concatenated output); ``fusable`` says the group may become one fused matrix (q|k|v, gate|up).
Replace = Callable[[nn.Module, list[str], str, bool], nn.Module]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (a linear whose weight is stored ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is ``[in, out]``)."""
    if is_conv1d(module):
        return module.weight.detach().t(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    raise UnsupportedModelError(f"expected nn.Linear or Conv1D, found {type(module).__name__}")


def model_type(model: nn.Module, who: str = "the lean runtime") -> str:
    """``model.config.model_type``, checked against :data:`SUPPORTED_MODEL_TYPES`."""
    config = getattr(model, "config", None)
    found = getattr(config, "model_type", None)
    if found not in FAMILIES:
        raise UnsupportedModelError(
            f"{who} supports {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs; this model is "
            f"{type(model).__name__} (model_type={found!r}). Use another optimizer, or open an issue with "
            "the architecture."
        )
    if not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"{type(model).__name__} has no lm_head: pass the *ForCausalLM model")
    return str(found)


def sliding_window(config: Any) -> int | None:
    """The attention window when the model uses one on every layer it has, else ``None``."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses = getattr(config, "use_sliding_window", True) and (not layer_types or "sliding_attention" in layer_types)
    return int(window) if window and uses else None


class Concat(nn.Module):
    """Unfused linears read as one (q|k|v, gate|up): several calls, one concatenated result."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


def keep(parent: nn.Module, names: list[str], label: str, fusable: bool) -> nn.Module:
    """The :data:`Replace` that changes nothing: the model's own linears, concatenated where grouped."""
    del label, fusable
    modules = [getattr(parent, n) for n in names]
    return modules[0] if len(modules) == 1 else Concat(modules)


def build_arch(model: Any, replace: Replace = keep) -> Arch:
    """Read ``model`` into an :class:`Arch`, passing each group of linears through ``replace``.

    Raises:
        UnsupportedModelError: a model type outside :data:`SUPPORTED_MODEL_TYPES`, or a variant of one that the
            lean loop would run wrongly (GPT-2 with cross-attention, Qwen3-style q/k norms).
    """
    kind = FAMILIES[model_type(model)]
    config = model.config
    layers: list[Layer] = []
    if kind == "gpt2":
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not a decoder-only LM")
        body = model.transformer
        heads = config.n_head
        head_dim = config.n_embd // heads
        for i, block in enumerate(body.h):
            scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            qkv = replace(block.attn, ["c_attn"], f"h.{i}.attn.c_attn", False)
            o = replace(block.attn, ["c_proj"], f"h.{i}.attn.c_proj", False)
            fc = replace(block.mlp, ["c_fc"], f"h.{i}.mlp.c_fc", False)
            down = replace(block.mlp, ["c_proj"], f"h.{i}.mlp.c_proj", False)
            layers.append(Layer(block.ln_1, block.ln_2, qkv, o, fc, down, block.mlp.act, scale))
        lm_head = replace(model, ["lm_head"], "lm_head", False)
        return Arch(
            kind, layers, body.wte, body.wpe, body.ln_f, lm_head, None, heads, heads, head_dim,
            config.n_inner or 4 * config.n_embd, config.layer_norm_epsilon, config.n_positions, None,
        )  # fmt: skip
    body = model.model
    for i, block in enumerate(body.layers):
        attn, mlp = block.self_attn, block.mlp
        if hasattr(attn, "q_norm"):
            raise UnsupportedModelError(f"{type(model).__name__}: q/k norms (Qwen3-style) are not supported")
        qkv = replace(attn, ["q_proj", "k_proj", "v_proj"], f"layers.{i}.qkv", True)
        o = replace(attn, ["o_proj"], f"layers.{i}.o_proj", False)
        gate_up = replace(mlp, ["gate_proj", "up_proj"], f"layers.{i}.gate_up", True)
        down = replace(mlp, ["down_proj"], f"layers.{i}.down_proj", False)
        layers.append(
            Layer(
                block.input_layernorm, block.post_attention_layernorm, qkv, o, gate_up, down, mlp.act_fn,
                float(attn.scaling),
            )
        )  # fmt: skip
    lm_head = replace(model, ["lm_head"], "lm_head", False)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return Arch(
        kind, layers, body.embed_tokens, None, body.norm, lm_head, body.rotary_emb, config.num_attention_heads,
        config.num_key_value_heads or config.num_attention_heads, head_dim, config.intermediate_size,
        config.rms_norm_eps, config.max_position_embeddings, sliding_window(config),
    )  # fmt: skip
