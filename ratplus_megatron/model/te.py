"""Whether Transformer Engine is usable; the one place that decides TE vs local modules."""
from __future__ import annotations

try:
    import transformer_engine  # noqa: F401
    import transformer_engine.pytorch  # noqa: F401

    HAVE_TE = True
except Exception:  # ImportError, or a broken build whose extension fails to load
    HAVE_TE = False
