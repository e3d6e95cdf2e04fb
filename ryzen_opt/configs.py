"""What every optimizer's frozen config dataclass shares: a dict view and a strict constructor from one.

``from_dict`` is where a TOML table (``ryzen-opt run``'s config) becomes a config: an unknown key is an error that
names the allowed keys, instead of being dropped silently; each config's ``__post_init__`` then checks the values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ryzen_opt.errors import ConfigError

C = TypeVar("C", bound="ConfigMixin")


class ConfigMixin:
    """Mixed into the frozen ``@dataclass`` configs (KernelConfig, CompressionConfig, KVCacheConfig, SpecConfig)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)
