"""Report files: written atomically, never with NaN, always with the environment they were measured in."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.0"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and an ``os.replace``.

    A reader (or a Ctrl-C) never sees a half-written file: either the old content or the new. The file gets the
    permissions a plain ``open`` would give it (0666 less the umask: 0644 usually), not ``mkstemp``'s private 0600:
    reports are meant to be read by CI artifact uploaders and teammates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    """The process umask (read by setting it and putting it back: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Serialise ``data`` strictly (``allow_nan=False``: NaN is not JSON) and write it atomically."""
    text = json.dumps(data, indent=2, allow_nan=False, sort_keys=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "value") and hasattr(obj, "name"):  # enums
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def git_sha(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The current commit, or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def environment(device: Any = None) -> dict[str, Any]:
    """The environment block of every report: device facts, git sha and a UTC timestamp."""
    # lazy: imports torch, and reports are written by the torch-free plugin
    from ryzen_opt.device import device_info

    env = device_info(device)
    env["git_sha"] = git_sha()
    env["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return env


REPORT_SCHEMAS = (
    "validation_report",
    "integration_test_report",
    "training_metrics_report",
    "phase2_final_report",
    "final_report",
)


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema shipped for report ``name`` (e.g. ``"validation_report"``)."""
    from importlib import resources

    if name not in REPORT_SCHEMAS:
        raise ValueError(f"unknown report {name!r}: the reports are {', '.join(REPORT_SCHEMAS)}")
    text = (
        resources.files("ryzen_opt.validation").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8")
    )
    return json.loads(text)


def validate_report(name: str, data: Any) -> None:
    """Raise ``jsonschema.ValidationError`` if ``data`` does not match report ``name``'s schema.

    Needs ``jsonschema`` (in the ``test`` extra).
    """
    import jsonschema

    jsonschema.validate(data, load_schema(name), cls=jsonschema.Draft202012Validator)


def run_sections(
    sections: dict[str, Any], names: list[str], args: Any, results: dict[str, Any], out: str | os.PathLike[str]
) -> None:
    """Run benchmark sections in order, rewriting ``out`` (atomically, environment included) after each one, so
    that an interrupted benchmark keeps everything it measured."""
    for name in names:
        sections[name](args, results)
        results["environment"] = environment()
        atomic_write_json(out, results)
