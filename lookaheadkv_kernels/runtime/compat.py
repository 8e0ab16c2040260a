"""The transformers versions the runtime works with, checked when the runtime is imported.

The runtime subclasses transformers' per-layer cache (`DynamicLayer`: `lazy_initialization(keys,
values)`, `is_initialized`), whose API settled in 5.0; 4.56 and 4.57 fail inside the cache. The
upper bound is the newest minor version tested (and what kvpress 0.5.x accepts).
"""

from __future__ import annotations

import importlib.metadata

TRANSFORMERS_MIN, TRANSFORMERS_BELOW = "5.0", "5.3"
TRANSFORMERS_INSTALL = f'pip install "transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"'


def check_transformers(found: str | None = None) -> None:
    """Raise ImportError unless transformers `found` (default: the installed one) is in the supported range."""
    if found is None:
        try:
            found = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(f"lookaheadkv_kernels.runtime needs transformers: {TRANSFORMERS_INSTALL}") from None
    from packaging.version import Version  # a dependency of transformers

    if not Version(TRANSFORMERS_MIN) <= Version(found) < Version(TRANSFORMERS_BELOW):
        raise ImportError(
            f"lookaheadkv_kernels.runtime needs transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}, "
            f"found {found}: {TRANSFORMERS_INSTALL}"
        )
