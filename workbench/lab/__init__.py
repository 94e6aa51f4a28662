"""The lab: benchmarks, the distributed-ring benchmarks, the Triton kernels' offline resource
counts, recorded results, the figures runner and the command line (``python -m workbench``). It
stands on the attention code; nothing in the attention code imports it."""

from . import records

__all__ = ["records"]
