"""The lab: benchmarks, the ring's tools, the Triton kernels' resource counts, records, the
figures runner and the command line (``python -m workbench``). Nothing outside it imports it."""

from . import records

__all__ = ["records"]
