"""lookaheadkv_kernels: fast, exact kernels for LookaheadKV KV-cache eviction.

Importing the package registers torch.ops.lookaheadkv.{lookahead_qproj, attention_scores,
lookahead_attention, select_compact}; the functions below are their Python API (docs/ops.md).
"""

from .ops import attention_scores, lookahead_attention, lookahead_qproj, select_compact

__version__ = "0.1.0"
__all__ = ["lookahead_qproj", "attention_scores", "lookahead_attention", "select_compact", "__version__"]
