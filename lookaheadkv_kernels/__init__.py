"""lookaheadkv_kernels: fast, exact kernels for LookaheadKV KV-cache eviction.

Importing the package registers torch.ops.lookaheadkv.{lookahead_qproj, attention_scores,
lookahead_attention, select_compact} (dense caches) and {paged_attention_scores,
paged_lookahead_attention, paged_select_compact} (ragged batches over paged caches); the functions
below are their Python API (docs/ops.md).
"""

from .ops import (
    attention_scores,
    lookahead_attention,
    lookahead_qproj,
    paged_attention_scores,
    paged_lookahead_attention,
    paged_select_compact,
    select_compact,
)

__version__ = "0.1.0"
__all__ = [
    "lookahead_qproj",
    "attention_scores",
    "lookahead_attention",
    "select_compact",
    "paged_attention_scores",
    "paged_lookahead_attention",
    "paged_select_compact",
    "__version__",
]
