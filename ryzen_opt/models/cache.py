"""The on-disk model cache: where it is, and the manifest that proves a cached directory complete.

A cached directory appears only complete (built in a temporary directory, then renamed), and every load checks
its manifest of sizes and SHA-256s: a truncated or corrupt cache is detected, so it can be removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$RYZEN_OPT_CACHE`` or ``~/.cache/ryzen_opt``."""
    return Path(os.environ.get("RYZEN_OPT_CACHE") or Path.home() / ".cache" / "ryzen_opt").expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def verify(path: Path) -> str | None:
    """``None`` when the cached zoo at ``path`` is complete and intact, else what is wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (the build did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"manifest.json is unreadable ({exc})"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']} (truncated?)"
        if sha256_file(f) != meta["sha256"]:
            return f"{rel} does not match its SHA-256 (corrupt)"
    return None
