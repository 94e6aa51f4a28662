"""What a launch configuration of our Triton kernels costs on a GPU, read from an offline
compile (no GPU needed): shared memory per program, registers and spilled bytes per thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from ..backends.triton_sparse import FP_FUSION, KERNELS, KernelConfig, jit_kernel

__all__ = ["SHARED_LIMIT", "Resources", "kernel_resources"]

SHARED_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448}
"""The opt-in shared memory maximum of one program, in bytes, by compute capability."""

_POINTERS = {
    "forward": ("Q", "K", "V", "OUT", "LSE"),
    "dkdv": ("Q", "K", "V", "DO", "DK", "DV", "LSE2", "DELTA"),
    "dq": ("Q", "K", "V", "DO", "DQ", "LSE2", "DELTA"),
}

_TYPES = {**dict.fromkeys(("LSE", "LSE2", "DELTA"), "*fp32"),  # float32 per query
          **dict.fromkeys(("F_N", "F_I", "P_N", "P_I", "P_START", "P_T", "BITS"), "*i32"),  # plan
          **dict.fromkeys(("qk_scale", "sm_scale"), "fp32")}


@dataclass(frozen=True)
class Resources:
    """One program's shared memory (bytes), registers per thread and spilled bytes per thread."""

    shared_bytes: int
    registers: int
    spill_bytes: int

    def fits(self, capability: tuple[int, int] = (9, 0)) -> bool:
        """The program can launch on a GPU of this compute capability (shared memory)."""
        return self.shared_bytes <= SHARED_LIMIT[capability]


def _signature(fn, name: str, dtype: str, cfg: KernelConfig, head_dim: int,
               constants: dict[str, object]) -> dict[str, str]:
    """Triton's type of every argument of ``fn`` as ``triton_sparse`` launches it."""
    rows = {"Q": cfg.block_m, "DO": cfg.block_m, "OUT": cfg.block_m,
            "K": cfg.block_n, "V": cfg.block_n}

    def kind(arg: str) -> str:
        if arg in constants:
            return "constexpr"
        if arg in _TYPES:
            return _TYPES[arg]
        if arg not in _POINTERS[name]:
            return "i32"
        if cfg.use_tma and arg in rows:
            return f"tensordesc<{dtype}[1,1,{rows[arg]},{head_dim}]>"
        return f"*{dtype}"

    return {arg: kind(arg) for arg in fn.arg_names}


def _aligned(fn, sig: dict[str, str], odd: tuple[str, ...]) -> dict[tuple[int], list]:
    """Divisibility by 16, as Triton's launcher specializes a typical launch, for every pointer
    and integer but the layout's head count and the ``odd`` ones (it changes the shared
    memory of the pipelined buffers)."""
    return {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
            if (sig[arg].startswith("*") or sig[arg] == "i32") and arg not in ("HL", *odd)}


def kernel_resources(kernel: str, config: KernelConfig, head_dim: int = 128, *,
                     block: int = 128, capability: tuple[int, int] = (9, 0),
                     dtype: str = "bf16", ragged: bool = False) -> Resources:
    """Compile ``kernel`` (one of ``triton_sparse.KERNELS``) with ``config`` for a GPU of
    ``capability`` (needs triton, no GPU) and read what one program uses; ``ragged``: the
    variant for lengths that are not a multiple of the tiles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    fn = jit_kernel(kernel)
    constants: dict[str, object] = {
        "HEAD_DIM": head_dim, "BLOCK": block, "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n, "EVEN_Q": not ragged, "USE_TMA": config.use_tma}
    if kernel == "forward":
        constants["STORE_LSE"] = True
    if kernel == "dkdv":
        constants["EVEN_K"] = not ragged
    sig = _signature(fn, kernel, dtype, config, head_dim, constants)
    src = ASTSource(fn=fn, signature=sig, constexprs=constants,
                    attrs=_aligned(fn, sig, ("q_len", "k_len") if ragged else ()))
    major, minor = capability
    compiled = triton.compile(src, target=GPUTarget("cuda", major * 10 + minor, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": config.num_stages,
                                       "enable_fp_fusion": FP_FUSION})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    if regs is None or local is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {kernel}:\n{usage}")
    return Resources(int(compiled.metadata.shared), int(regs.group(1)), int(local.group(1)))
