"""Loading causal LMs the way users already do: ``from_pretrained`` on a local directory or a hub id.

Hub downloads are not possible on every machine (CI here has no route to a model hub). ``from_pretrained`` would
then retry for half a minute before failing with a generic message, so ``load_model`` checks reachability first
and fails in seconds with a message that says to pass a local directory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ryzen_opt.device import resolve_device
from ryzen_opt.errors import ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` keeps the checkpoint's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything with a leading ./ ~ / or more than one separator is a path.
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or os.path.isabs(name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connect within ``timeout`` seconds (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model directory {str(path)!r} does not exist. Pass a directory written by save_pretrained() "
            "(it holds config.json and the weights), or a hub id on a machine with network access."
        )
    if not path.is_dir():
        raise ModelLoadError(
            f"{str(path)!r} is a file, not a model directory: pass the directory that holds config.json"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{str(path)!r} has no config.json, so it is not a transformers model directory. Save the model with "
            "model.save_pretrained(path), or point at the directory that holds config.json."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{config_path} is not valid JSON ({exc}). The file is corrupt or truncated: re-save the model with "
            "save_pretrained(), or restore config.json from the original checkpoint."
        ) from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(
            f"{config_path} has no 'model_type' key, so transformers cannot tell which architecture to build. "
            "Re-save the model with save_pretrained()."
        )


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: bool = True,
    connect_timeout: float = 3.0,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal LM (and its tokenizer) with ``AutoModelForCausalLM.from_pretrained``.

    Args:
        name_or_path: a local directory written by ``save_pretrained``, a ``.gguf`` file (or a directory holding one
            and no ``config.json``), or a hub id such as ``"org/name"``.
        device: where to put the model (see ``resolve_device``).
        dtype: ``"float32"``, ``"bfloat16"``, a ``torch.dtype``, or ``None`` for the checkpoint's own dtype.
        tokenizer: also load the tokenizer with ``AutoTokenizer``. A local directory without tokenizer files
            yields ``None`` and a log line, since weights-only directories are common for speed tests.
        connect_timeout: seconds to wait for the hub before declaring it unreachable.
        **from_pretrained_kwargs: passed through to ``from_pretrained`` (``attn_implementation=`` and so on).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Raises:
        ModelLoadError: missing or corrupt directory, or a hub id that cannot be reached; the message says what to do.
    """

    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    kwargs: dict[str, Any] = dict(from_pretrained_kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype

    gguf = find_gguf(local) if local.exists() else None
    if gguf is not None:
        return load_gguf(gguf, dev, torch_dtype, tokenizer=tokenizer, **from_pretrained_kwargs)
    if local.exists() or looks_like_path(name):
        _check_local_dir(local)
        source = str(local)
        kwargs.setdefault("local_files_only", True)
        want_tokenizer = tokenizer and any((local / f).exists() for f in _TOKENIZER_FILES)
        if tokenizer and not want_tokenizer:
            logger.info("%s has no tokenizer files; returning tokenizer=None", local)
    else:
        source = name
        want_tokenizer = tokenizer
        if not kwargs.get("local_files_only") and not hub_reachable(connect_timeout):
            # The hub cache may still hold it; only a cache miss is an error.
            kwargs["local_files_only"] = True
            try:
                return _load(AutoModelForCausalLM, AutoTokenizer, source, dev, want_tokenizer, kwargs)
            except OSError as exc:
                raise ModelLoadError(
                    f"cannot load {name!r}: the model hub is not reachable from this machine (no network, or "
                    "HF_HUB_OFFLINE=1) and the model is not in the local Hugging Face cache. Download it elsewhere and "
                    "pass its local directory instead, e.g. load_model('/path/to/model_dir')."
                ) from exc
    try:
        return _load(AutoModelForCausalLM, AutoTokenizer, source, dev, want_tokenizer, kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"transformers could not load {name!r}: {exc}") from exc


def _load(
    model_cls: Any, tokenizer_cls: Any, source: str, device: torch.device, want_tokenizer: bool, kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    model = model_cls.from_pretrained(source, **kwargs)
    model.eval()
    model.to(device)
    tok = None
    if want_tokenizer:
        tok_kwargs = {"local_files_only": kwargs.get("local_files_only", False)}
        tok = tokenizer_cls.from_pretrained(source, **tok_kwargs)
    logger.info("loaded %s (%s, %s) on %s", source, type(model).__name__, model.dtype, device)
    return model, tok


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself if it is a ``.gguf`` file, the one ``.gguf`` of a directory without
    ``config.json``, else ``None``. A directory with several is an error: which one was meant is not ours to guess."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelLoadError(
            f"{str(path)!r} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}): pass the file itself"
        )
    return found[0] if found else None


def load_gguf(
    path: Path,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    *,
    tokenizer: bool = True,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a GGUF checkpoint through transformers (``from_pretrained(dir, gguf_file=name)``).

    transformers dequantizes every tensor (Q4_1, Q8_0, ...) to ``dtype`` (float32 by default): the result is a plain
    model, the reference that ryzen-opt's optimizers quantize again. ``config.quantization_config`` is dropped, since
    it describes the file, not the model in memory, and ``save_pretrained`` would otherwise write a config that
    claims GGUF weights. Needs the ``gguf`` package; converting takes tens of seconds (the tokenizer dominates), so
    :func:`ryzen_opt.models.zoo.reference_model` converts once and caches a safetensors directory.
    """

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"reading {path.name} needs the gguf package: pip install gguf") from exc
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "local_files_only": True, **from_pretrained_kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"transformers could not read the GGUF file {str(path)!r}: {exc}") from exc
    # The tensors in memory are plain floats: the "quantization" transformers records is the file's, and with it
    # save_pretrained refuses to write the model ("quantized with gguf and is not serializable").
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.eval().to(dev)
    logger.info("loaded %s (%s, %s) on %s", path, type(model).__name__, model.dtype, dev)
    return model, tok
