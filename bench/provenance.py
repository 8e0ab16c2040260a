"""The bench scripts' results header (lookaheadkv_kernels.provenance)."""

from lookaheadkv_kernels.provenance import provenance

__all__ = ["provenance"]
