"""Bridges to other libraries, each imported only by name (``from workbench.integrations import
hf``), so that ``import workbench`` never imports them.

- :mod:`workbench.integrations.hf`: block-sparse attention inside HuggingFace transformers
  models (``attn_implementation="workbench"``, :func:`~workbench.integrations.hf.use_pattern`).
"""
