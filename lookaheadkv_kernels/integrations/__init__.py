"""LookaheadKV in other libraries' APIs: one module or package per library (`kvpress`, ...), imported
on its own, so that every library stays optional; this package imports none of them."""
