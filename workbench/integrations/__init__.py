"""Bridges to other libraries, each imported on first use (``wb.integrations.hf``), so that
``import workbench`` never imports them.

- :mod:`workbench.integrations.hf`: block-sparse attention inside HuggingFace transformers
  models (``attn_implementation="workbench"``, :func:`~workbench.integrations.hf.use_pattern`).
"""

import importlib

__all__ = ["hf"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
