"""Command line: python -m workbench COMMAND (installed as workbench too).

figures reruns the notebooks; bench*, copy-bandwidth and triton-resources measure and write CSV
under data/; ring-* run the distributed ring (under torchrun). A value a command cannot use ends
it before any work with one line on stderr, "workbench COMMAND: error: OPTION: what to use", and
status 2; so does an error raised while it runs (WORKBENCH_DEBUG=1 shows its traceback). Ctrl-C
ends a command with status 130.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import inspect
import json
import keyword
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import bench, overhead, ring_bench
from .records import environment, write_csv

PROG = "workbench"
DEBUG_ENV = "WORKBENCH_DEBUG"
_USER_ERRORS = (ValueError, TypeError, NotImplementedError, RuntimeError, OSError)
"""Errors from the library that :func:`main` reports as one line (a value it cannot use)."""


class UsageError(Exception):
    """A value a command cannot use here or with the other options; the message names the
    option and what to use instead."""


# ------------------------------------------------------------------------ argument types
def _arg_type(convert: Callable[[str], Any], accept: Callable[[Any], object],
              what: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert(text)`` when it converts (to other than None) and
    ``accept`` takes the value, else the error "<text> is not <what>" (blank text quoted)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            shown = text if text.strip() else repr(text)
            raise argparse.ArgumentTypeError(f"{shown} is not {what}")
        return value

    return parse


positive_int = _arg_type(int, lambda n: n > 0, "a positive integer")
nonnegative_int = _arg_type(int, lambda n: n >= 0, "a non-negative integer")
power_of_two_head_dim = _arg_type(int, lambda n: n >= 16 and not n & (n - 1),
                                  "a power of two >= 16 (the Triton kernels' head widths)")
positive_float = _arg_type(float, lambda x: 0 < x < math.inf, "a positive finite number")
positive_float_or_inf = _arg_type(float, lambda x: 0 < x <= math.inf,
                                  "a positive number (or inf)")
device = _arg_type(str, re.compile(r"cpu|cuda(:[0-9]+)?").fullmatch,
                   "a device: use cpu, cuda or cuda:N")
cuda_device = _arg_type(str, re.compile(r"cuda(:[0-9]+)?").fullmatch,
                        "a CUDA device; this command measures a GPU: use cuda or cuda:N")
study_name = _arg_type(str, re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*").fullmatch,
                       "a study name: use letters, digits, '_' and '-' (it names the data/ "
                       "file), e.g. cpu_small")


def _parse_override(text: str) -> tuple[str, object] | None:
    """``NAME=VALUE`` as ``(NAME, VALUE)``, the value parsed as JSON (else kept as a string);
    None unless ``NAME`` is a Python name (a notebook parameter)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or keyword.iskeyword(name):
        return None
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


notebook_override = _arg_type(_parse_override, bool, "NAME=VALUE with NAME a notebook "
                              "parameter, e.g. seq_len=1000")


# ------------------------------------------------------------------------ one-line errors
class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :func:`_exit_with_error`'s, the option first."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        if message.startswith("the following arguments are required"):
            message += f" (see {self.prog} --help)"
        _exit_with_error(self.prog, message)


def _exit_with_error(prog: str, message: str) -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with status 2."""
    text = " ".join(message.split())  # one line, whatever the message's layout
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ------------------------------------------------------------------------ checks before work
def _check_device(args: argparse.Namespace, gpu_only: bool) -> None:
    """``--device`` exists on this machine: CUDA is there when asked for (always, for a command
    that measures a GPU) and ``cuda:N`` is one of its devices."""
    dev = getattr(args, "device", "cpu")
    if dev == "cpu":
        return
    if not torch.cuda.is_available():
        if gpu_only:
            raise UsageError(f"{args.command} measures a CUDA GPU and this machine has none: "
                             "run it on a machine with one")
        raise UsageError(f"--device {dev} needs a CUDA GPU; this machine has none: use "
                         "--device cpu")
    index, count = int(dev.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {dev}: this machine has {count} CUDA device(s): use cuda:0"
                         + (f" to cuda:{count - 1}" if count > 1 else ""))


def _check_data_dir(command: str) -> None:
    """A command that records rows has a folder to write them to (the project's ``data/``, or
    ``$WORKBENCH_DATA_DIR``) before its work starts."""
    from ..project import ProjectNotFoundError, data_dir

    try:
        data_dir()
    except ProjectNotFoundError as err:
        raise UsageError(f"{command} writes its rows to a project's data/ and found none: "
                         f"{err}, or WORKBENCH_DATA_DIR=PATH for the CSV files alone") from None


def _require_module(module: str, command: str, install: str) -> None:
    """``module`` can be imported; otherwise what to install."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{command} needs the {module} package, which is not installed: "
                         f"{install}")


def _notebook_parameters(path: Path) -> set[str] | None:
    """Names assigned in the notebook's ``parameters`` cell; None when it cannot be read."""
    try:
        cells = json.loads(path.read_text())["cells"]
        tree = ast.parse(next("".join(cell["source"]) for cell in cells
                              if "parameters" in cell.get("metadata", {}).get("tags", [])))
    except (OSError, KeyError, ValueError, SyntaxError, StopIteration):
        return None
    nodes = list(ast.walk(tree))
    targets = [t for node in nodes if isinstance(node, ast.Assign) for t in node.targets]
    targets += [node.target for node in nodes if isinstance(node, ast.AnnAssign)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _check_figures(args: argparse.Namespace) -> None:
    """The project has notebooks, each ``--only`` prefix matches one, and a run has papermill,
    ``--profile`` in every chosen notebook, each ``-p`` name among their parameters and, with
    ``--save-outputs``, the default parameters. ``args.root`` becomes the project's path."""
    from ..project import ProjectNotFoundError, find_root
    from .figures import discover, select

    try:
        args.root = find_root(args.root)
    except ProjectNotFoundError as err:
        raise UsageError(f"--root {args.root}: {err}" if args.root else
                         f"{err}, or pass --root PATH") from None
    specs = discover(args.root)
    if not specs:
        raise UsageError(f"{args.root / 'notebooks'} holds no notebook (*.ipynb): nothing to "
                         "run or check; use --root to name another project")
    for prefix in args.only or []:
        if not any(s.name.startswith(prefix) for s in specs):
            raise UsageError(f"--only {prefix}: no notebook name starts with it; notebooks: "
                             f"{', '.join(s.name for s in specs)}")
    if args.list or args.check:
        return
    chosen = select(specs, args.only)
    overrides = dict(args.param or [])
    profile = args.profile if args.profile not in (None, "default") else None
    if args.save_outputs and (overrides or profile):
        raise UsageError("--save-outputs records the default parameters' outputs: drop "
                         "--profile and -p, or --save-outputs")
    if profile is not None:
        lacking = [s.name for s in chosen if profile not in s.profiles]
        if lacking:
            raise UsageError(f"--profile {profile}: no such profile in {', '.join(lacking)}; "
                             "choose notebooks that have it with --only, or another profile")
    params = [_notebook_parameters(s.path) for s in chosen]
    if overrides and None not in params:
        known = set().union(*params)
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"did you mean {close[0]}?" if close else "see their parameters cells"
                raise UsageError(f"-p {name}: no notebook run here has a parameter {name!r}; "
                                 f"{hint}")
    _require_module("papermill", "figures (running notebooks)",
                    "pip install 'workbench[notebooks]' (--list and --check need no papermill)")


def _check_bench(args: argparse.Namespace) -> None:
    """Every variant runs for a requested family on the device (else it would leave no rows
    and no word about it) and every family's pattern builds with ``--heads``."""
    on_cpu = args.device == "cpu"
    if "triton" in args.variants and on_cpu:
        raise UsageError("--variants triton: our Triton kernels run on CUDA only: drop it, or "
                         "use --device cuda on a GPU machine")
    longnet = bench.longnet_families()
    strided = [v for v in args.variants if v in ("strided_view", "strided_gather", "paper")]
    if strided and not set(args.families) & set(longnet):
        raise UsageError(f"--variants {strided[0]} applies to the dilated families only: add "
                         f"{' or '.join(longnet)} to --families, or drop it")
    if "strided_view" in args.variants:  # a view of every segment needs whole segments
        for family in sorted(set(args.families) & set(longnet)):
            for s in args.seq_lens or ():
                segments = sorted(set(bench.family_pattern(family, s, args.heads)[0].w))
                if any(s % w for w in segments):
                    raise UsageError(f"--variants strided_view needs lengths that are multiples "
                                     f"of every segment of {family} ({segments} at {s}): drop "
                                     "strided_view or that length")
    if args.backward and args.grad_forward:
        raise UsageError("--grad-forward times a forward alone: drop it or --backward")
    if "flex_natural" in args.variants and args.backward and on_cpu:
        raise UsageError("--variants flex_natural: FlexAttention has no CPU backward: drop "
                         "--backward or flex_natural, or use --device cuda on a GPU machine")
    if not args.seq_lens and not args.layout_timing:
        raise UsageError("bench needs --seq-lens (attention timings), --layout-timing (layout "
                         "build timings) or both")
    _check_patterns(args.families, args.seq_lens or (), args.heads)


def _check_patterns(families: Sequence[str], seq_lens: Sequence[int], heads: int) -> None:
    """Every family's pattern builds at every length with ``heads`` heads."""
    for family in families:
        for s in seq_lens:
            try:
                bench.family_pattern(family, s, heads)
            except (ValueError, TypeError) as err:
                raise UsageError(f"--heads {heads} with --families {family}: {err}") from None


def _check_overhead(args: argparse.Namespace) -> None:
    """The entry points' patterns build at every length with ``--heads`` (defaults of the
    device's type where left out)."""
    shape = overhead.DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    dilated = any(e.startswith("dilated") for e in args.entry_points)
    _check_patterns(["random10"] + ["dilated"] * dilated, args.seq_lens or shape["seq_lens"],
                    args.heads or shape["heads"])


def _check_longest(args: argparse.Namespace) -> None:
    if args.limit < args.start:
        raise UsageError(f"--limit {args.limit} is below --start {args.start}: nothing would "
                         "run; raise --limit or lower --start")


def _check_triton_resources(args: argparse.Namespace) -> None:
    """``--capability`` is a GPU whose shared memory limit is known."""
    from .triton_resources import SHARED_LIMIT

    if tuple(args.capability) not in SHARED_LIMIT:
        known = ", ".join(f"{a} {b}" for a, b in SHARED_LIMIT)
        raise UsageError(f"--capability {args.capability[0]} {args.capability[1]}: no shared "
                         f"memory limit is known for it; use one of: {known}")


def _check_ring(args: argparse.Namespace) -> int:
    """Every family's pattern builds with ``--heads`` and every length splits into whole blocks
    over the ranks (``--world``, else torchrun's) under every sharding; ``--backend`` can run
    here. Returns the number of ranks."""
    from ..sharding import shard_plan

    if getattr(args, "backend", None) == "nccl" and not torch.cuda.is_available():
        raise UsageError("--backend nccl needs CUDA GPUs; this machine has none: use "
                         "--backend gloo")
    option, seq_lens = (("--seq-len", [args.seq_len]) if hasattr(args, "seq_len")
                        else ("--seq-lens", args.seq_lens))
    under_torchrun = "RANK" in os.environ and os.environ.get("WORLD_SIZE", "").isdigit()
    world = getattr(args, "world", None) or max(1, int(os.environ["WORLD_SIZE"])
                                                if under_torchrun else 1)
    ranks = f"--world {world}" if hasattr(args, "world") else f"{world} rank(s)"
    _check_patterns(args.families, seq_lens, args.heads)
    for s in seq_lens:
        for kind in getattr(args, "shardings", None) or [args.sharding]:
            try:
                shard_plan(s, world, args.block_size, kind)
            except (ValueError, TypeError) as err:
                raise UsageError(f"{option} {s} with --block-size {args.block_size} and "
                                 f"{ranks}: {err}") from None
    return world


def _check_ring_bench(args: argparse.Namespace) -> None:
    """:func:`_check_ring`; with ``--baseline`` the lengths divide by the number of ranks;
    ``--double-until`` has one start length at or below it."""
    world = _check_ring(args)
    if args.baseline and any(s % world for s in args.seq_lens):
        raise UsageError(f"--baseline runs S / {world} tokens on one rank: every --seq-lens "
                         f"value must be a multiple of {world}, got {args.seq_lens}")
    if args.double_until is None:
        return
    if len(args.seq_lens) != 1:
        raise UsageError(f"--double-until doubles one length: give one --seq-lens value, got "
                         f"{len(args.seq_lens)}")
    if args.double_until < args.seq_lens[0]:
        raise UsageError(f"--double-until {args.double_until} is below --seq-lens "
                         f"{args.seq_lens[0]}: nothing would run; raise --double-until")


# ------------------------------------------------------------------------ the commands
def _call(fn: Callable[..., Any], args: argparse.Namespace, **given: object) -> Any:
    """``fn`` called with ``given`` and every option whose name is one of its parameters (a
    list as a tuple)."""
    taken = inspect.signature(fn).parameters
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
               if k in taken}
    return fn(**{**options, **given})


def _shown_and_written(rows: list[dict], name: str | None = None, dev: str = "cpu") -> int:
    """Print ``rows`` (``key=value``, less the environment) and, given a ``name``, write them
    to ``data/<name>.csv``; returns 0."""
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()
                        if k not in ("device", "torch", "date", "triton")))
    if name is not None:
        write_csv(rows, name, dev)
    return 0


def _figures(args: argparse.Namespace) -> int:
    from .figures import check_figures, discover, run_notebooks, select

    specs = select(discover(args.root), args.only)
    if args.list:
        for spec in specs:
            print(f"{spec.name}  (profiles: {', '.join(['default', *spec.profiles])})")
            for fig in spec.figures:
                print(f"    figures/{fig}")
            for data in spec.data:
                print(f"    data/{data}")
        return 0
    if args.check:
        missing = check_figures(specs, root=args.root)
    else:
        missing = run_notebooks(specs, profile=args.profile, overrides=dict(args.param or []),
                                save_outputs=args.save_outputs, root=args.root)
    if missing:
        print("declared figures not written:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    print(f"ok: {sum(len(s.figures) for s in specs)} figures from {len(specs)} notebooks")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.seq_lens:
        for r in bench.run_bench(_call(bench.BenchConfig, args)):
            print(f"{r['seq_len']:>8} {r['family']:>9} {r['variant']:>13} {r['pass']:>8} "
                  f"{r['ms']:>10} ms {r['useful_tflops']:>8} TFLOP/s {r['peak_mib']:>9} MiB "
                  f"{r['status']}")
    if args.layout_timing:
        from tqdm.auto import tqdm

        name = f"bench_{args.study}_layout" if args.seq_lens else f"layouts_{args.study}"
        rows: list[dict] = []

        def record(r: dict) -> None:  # the file is written again after every case
            rows.append(r)
            write_csv(rows, name, args.device)
            cell = "" if r["cell"] is None else f" cell={r['cell']}"
            took = (f": layout {r['build_ms']} ms, flex BlockMask {r.get('flex_mask_ms')} ms, "
                    f"triton plan {r.get('triton_plan_ms')} ms" if "build_ms" in r else "")
            tqdm.write(f"layout {r['family']:>9} heads={r['heads']}{cell} S={r['seq_len']} "
                       f"block={r['block_size']}{took} [{r['status']}]")

        for s in args.layout_timing:
            bench.layout_build_time(
                s, args.block_size, args.families, args.layout_heads or [args.heads],
                args.device, cells=args.layout_cells or (), reps=args.reps,
                max_seconds=args.layout_max_seconds, max_gib=args.layout_max_gib,
                progress=True, on_row=record)
    return 0


def _bench_longest(args: argparse.Namespace) -> int:
    _call(bench.longest_sequence, args)  # prints and writes each length as it goes
    return 0


def _bench_triton(args: argparse.Namespace) -> int:
    name = "configs" if args.space == "launch" else args.space
    return _shown_and_written(_call(
        bench.triton_config_study, args, configs=bench.kernel_configs(args.space),
        backward=args.space == "backward", csv_name=f"bench_{args.study}_triton_{name}"))


def _bench_overhead(args: argparse.Namespace) -> int:
    for r in _call(overhead.overhead_study, args):
        print(f"{r['seq_len']:>6} {r['entry_point']:>19} {r['backend']:>9}  ours {r['ours_us']:>9} "
              f"us  kernel {r['kernel_us']:>9} us  overhead {r['overhead_us']:>8} us "
              f"(CPU time {r['cpu_overhead_us']:>8} us)")
    return 0


def _triton_resources(args: argparse.Namespace) -> int:
    rows = _call(bench.triton_resource_study, args)
    for r in rows:
        print(f"{r['kernel']:>8} d={r['head_dim']:<3} {r['space']:>8} {r['block_m']}x"
              f"{r['block_n']} w{r['num_warps']} s{r['num_stages']} tma={r['use_tma']!s:<5} "
              f"{r['shared_bytes'] / 1024:7.1f} KiB {'fits' if r['fits'] else 'TOO BIG'} "
              f"{r['registers']} regs {r['spill_bytes']} B spilled")
    write_csv(rows, f"triton_resources_{args.study}", "cpu")
    return 0


def _copy_bandwidth(args: argparse.Namespace) -> int:
    env = environment(args.device)
    rows = [{**env, **r} for r in _call(bench.copy_bandwidth, args)]
    print(f"copy bandwidth: {rows[0]['gb_s']} GB/s (read + write)")
    write_csv(rows, f"bench_{args.study}_copy", args.device)
    return 0


def _ring_demo(args: argparse.Namespace) -> int:
    rows = _call(ring_bench.ring_demo, args)
    return 0 if all(r["max_abs_error"] <= r["tolerance"] for r in rows) else 1


def _ring_bench(args: argparse.Namespace) -> int:
    if all(r["status"] == "ok" for r in _call(ring_bench.ring_bench, args)):
        return 0
    # A case failed: the data-plane group may hold unmatched transfers, which can abort a
    # normal interpreter exit. Every row is written; end here. A longest-sequence search is
    # meant to end at its first failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if args.double_until is not None else 1)


# ------------------------------------------------------------------------ the parser
@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, what it runs, its options (space-separated flags to
    argparse settings, over :data:`_OPTIONS`' for the same flags) and its checks before work:
    ``check``, the module it ``needs`` and how to install it, whether it measures a GPU
    (``gpu_only``) and writes to ``data/``."""

    help: str
    run: Callable[[argparse.Namespace], int]
    options: dict[str, dict] = field(default_factory=dict)
    check: Callable[[argparse.Namespace], object] | None = None
    needs: tuple[str, str] | None = None
    gpu_only: bool = False
    writes: bool = True


_OPTIONS: dict[str, dict] = {
    "--study": dict(type=study_name, required=True),
    "--seq-lens": dict(nargs="+", type=positive_int, metavar="S"),
    "--seq-len": dict(type=positive_int),
    "--families": dict(nargs="+", metavar="NAME"),
    "--heads": dict(type=positive_int, default=16),
    "--head-dim": dict(type=positive_int, default=128),
    "--dtype": dict(default="bf16", choices=list(bench.DTYPES)),
    "--block-size": dict(type=positive_int, default=128),
    "--reps": dict(type=positive_int, default=20,
                   help="timed calls; the median is recorded (default: %(default)s)"),
    "--warmup": dict(type=nonnegative_int),
    "--backward": dict(action="store_true", help="time forward+backward (default: forward)"),
    "--device": dict(type=device, default="cuda", metavar="{cpu,cuda,cuda:N}",
                     help="where to run (default: %(default)s)"),
    "--backend": dict(default=None, choices=["gloo", "nccl"]),
    "--timeout": dict(type=positive_float, help="seconds before a silent rank is reported"),
}
"""Every option two commands share, declared once; a command's entry overrides its settings."""
_SHAPE = {"--heads": {}, "--head-dim": {}, "--dtype": {}, "--block-size": {}}
_GPU = {"type": cuda_device, "metavar": "cuda[:N]", "help": "the CUDA device to measure "
        "(default: %(default)s)"}


def _study(output: str, default: str | None = None) -> dict:
    """``--study``: the name in the output file ``data/<output>.csv``."""
    return dict(required=default is None, default=default,
                help=f"writes data/{output}.csv" + (f" (default: {default})" if default else ""))


def _families(default: Sequence[str]) -> dict:
    names = bench.bench_families()
    return dict(default=list(default), choices=names,
                help=f"from: {', '.join(names)} (default: {' '.join(default)})")


def _commands() -> dict[str, Command]:
    from ..distributed import SHARDINGS

    any_device = dict(default="cuda" if torch.cuda.is_available() else "cpu")
    return {
        "figures": Command("rerun the notebooks, which write figures/ and data/", _figures, {
            "--root": dict(type=Path, default=None, metavar="PATH",
                           help="the project (default: $WORKBENCH_ROOT, else the nearest one "
                                "at or above the working directory)"),
            "--list": dict(action="store_true", help="list notebooks and declared figures"),
            "--only": dict(nargs="+", metavar="NAME", help="notebook name prefixes to run"),
            "--profile": dict(default=None, help="named parameter profile (default: none)"),
            "-p --param": dict(action="append", type=notebook_override, metavar="NAME=VALUE",
                               help="override a notebook parameter (value parsed as JSON)"),
            "--check": dict(action="store_true",
                            help="do not run; check that every declared figure exists"),
            "--save-outputs": dict(action="store_true", help="replace notebooks/*.ipynb with "
                                   "the executed ones (default parameters)"),
        }, _check_figures, writes=False),
        "bench": Command("time variants against baselines per family and length", _bench, {
            "--study": _study("bench_<study>"),
            "--seq-lens": dict(help="lengths to time attention at (leave out to time layouts "
                                    "alone)"),
            "--families": _families(bench.DEFAULT_FAMILIES),
            "--variants": dict(nargs="+", default=["ours", "sdpa_dense"], choices=bench.VARIANTS,
                               metavar="NAME", help=f"from: {', '.join(bench.VARIANTS)} "
                               "(default: ours sdpa_dense; ours is what backend='auto' runs)"),
            "--batch": dict(type=positive_int, default=1), **_SHAPE, "--reps": {},
            "--warmup": dict(default=3), "--backward": {},
            "--grad-forward": dict(action="store_true",
                                   help="time the forward of inputs that require grad"),
            "--device": any_device,
            "--layout-timing": dict(nargs="*", type=positive_int, metavar="S", help="time "
                                    "building the layouts and kernel structures at these lengths"
                                    "; writes data/bench_<study>_layout.csv (without --seq-lens "
                                    "data/layouts_<study>.csv)"),
            "--layout-heads": dict(nargs="+", type=positive_int, metavar="H",
                                   help="head counts of the layout timing (default: --heads)"),
            "--layout-cells": dict(nargs="+", type=positive_int, metavar="C", help="cell sizes "
                                   "of the layout timing (default: each family's own)"),
            "--layout-max-seconds": dict(type=positive_float_or_inf, default=math.inf,
                                         help="skip a case predicted to take longer per build"),
            "--layout-max-gib": dict(type=positive_float_or_inf, default=math.inf,
                                     help="skip a case (or a triton plan) needing more memory"),
        }, _check_bench),
        "bench-hilbert": Command(
            "2-D neighbourhood attention per token and visit order; writes "
            "data/03_hilbert_gpu.csv",
            lambda a: _shown_and_written(_call(bench.hilbert_study, a), "03_hilbert_gpu",
                                         a.device), {
                "--grids": dict(nargs="+", type=positive_int, default=[128, 256], metavar="G",
                                help="grid sides (G x G tokens)"),
                "--radii": dict(nargs="+", type=nonnegative_int, default=[4, 16], metavar="R"),
                "--reps": {}, "--device": {}}),
        "bench-adaptive": Command(
            "adaptive selection's cost against its attention; writes "
            "data/04_selection_cost_gpu.csv",
            lambda a: _shown_and_written(_call(bench.adaptive_cost_study, a),
                                         "04_selection_cost_gpu", a.device),
            {"--seq-lens": dict(default=[16384, 65536]), "--reps": {}, "--device": {}}),
        "bench-longest": Command(
            "the longest sequence one GPU runs, per family", _bench_longest, {
                "--study": _study("bench_<study>_longest", "h100"),
                "--families": _families(bench.DEFAULT_FAMILIES),
                "--start": dict(type=positive_int, default=262144),
                "--limit": dict(type=positive_int, default=1 << 24),
                "--max-seconds": dict(type=positive_float_or_inf, default=math.inf,
                                      help="skip a length predicted to take longer"),
                "--backward": {},
                "--memory-gib": dict(type=positive_float, default=None, help="search as on a "
                                     "card of this much memory (GiB, as CUDA reports it)"),
                "--device": _GPU}, _check_longest, gpu_only=True),
        "copy-bandwidth": Command(
            "device copy bandwidth (the roofline's memory side)", _copy_bandwidth, {
                "--study": _study("bench_<study>_copy", "h100"),
                "--mib": dict(type=positive_int, default=1024), "--reps": {}, "--device": {}}),
        "bench-triton": Command(
            "our Triton kernels under each launch configuration", _bench_triton, {
                "--study": _study("bench_<study>_triton_*", "h200"),
                "--seq-len": dict(default=65536),
                "--families": _families(["dense", "random10", "causal", "local"]),
                "--space": dict(choices=["launch", "features", "backward"], default="launch",
                                help="launch: tile edges, warps, stages; features: with and "
                                     "without TMA; backward: the backward kernels' parameters"),
                "--reps": {}, "--device": _GPU},
            needs=("triton", "install a CUDA build of torch (it brings triton)"), gpu_only=True),
        "bench-overhead": Command(
            "per-call time of every entry point against the kernel it launches", _bench_overhead, {
                "--study": _study("overhead_<study>"),
                "--seq-lens": dict(help="default: 512 to 8192 on CUDA, 256 to 1024 on the CPU"),
                "--entry-points": dict(nargs="+", default=list(overhead.ENTRY_POINTS),
                                       choices=overhead.ENTRY_POINTS),
                "--heads": dict(default=None, help="default: 16 on CUDA, 4 on the CPU"),
                "--head-dim": dict(default=None, help="default: 128 on CUDA, 32 on the CPU"),
                "--dtype": dict(default=None, help="default: bf16 on CUDA, fp32 on the CPU"),
                "--block-size": dict(default=None, help="default: 128 on CUDA, 64 on the CPU"),
                "--reps": dict(default=200), "--warmup": dict(default=20),
                "--device": any_device}, _check_overhead),
        "triton-resources": Command(
            "shared memory and registers of our Triton kernels, compiled offline (no GPU "
            "needed)", _triton_resources, {
                "--study": _study("triton_resources_<study>", "sm90"),
                "--head-dims": dict(nargs="+", type=power_of_two_head_dim, default=[64, 128, 256],
                                    metavar="D", help="head widths: powers of two >= 16"),
                "--capability": dict(nargs=2, type=nonnegative_int, default=[9, 0],
                                     metavar=("MAJOR", "MINOR"),
                                     help="compute capability of the target GPU"),
            }, _check_triton_resources, needs=("triton", "pip install triton")),
        "ring-demo": Command(
            "check the distributed ring against one process (torchrun)", _ring_demo, {
                "--seq-len": dict(default=1000),
                "--heads": dict(default=4), "--head-dim": dict(default=32),  # float64 check
                "--block-size": dict(default=64),
                "--families": _families(["causal", "local", "random10", "dilated"]),
                "--sharding": dict(default="zigzag", choices=SHARDINGS),
                "--backend": {}, "--timeout": dict(default=120.0)}, _check_ring, writes=False),
        "ring-bench": Command("time the distributed ring (torchrun)", _ring_bench, {
            "--study": _study("ring_<study>"),
            "--seq-lens": dict(required=True, help="total sequence lengths (all ranks together)"),
            "--families": _families(["causal", "local"]),
            "--shardings": dict(nargs="+", default=["contiguous"], choices=SHARDINGS),
            **_SHAPE, "--reps": dict(default=10), "--warmup": dict(default=2),
            "--backward": {}, "--backend": {}, "--timeout": dict(default=600.0),
            "--double-until": dict(type=positive_int, default=None, metavar="S_MAX",
                                   help="double the one --seq-lens value up to S_MAX or a failure"),
            "--baseline": dict(action="store_true", help="also run rank 0 alone at the per-rank "
                               "length (parallel efficiency)"),
            "--profile": dict(type=nonnegative_int, default=0, metavar="N", help="profile one "
                              "call per case: its N costliest operators per rank, to "
                              "data/ring_<study>_profile.csv"),
        }, _check_ring_bench),
        "ring-plan": Command(
            "each (rank, step) of a ring, run on one device",
            lambda a: _shown_and_written(_call(ring_bench.ring_plan_study, a)), {
                "--study": _study("ring_<study>_plan"),
                "--world": dict(type=positive_int, default=2),
                "--seq-lens": dict(required=True),
                "--families": _families(["causal", "random10", "local", "dilated"]),
                "--shardings": dict(nargs="+", default=list(SHARDINGS), choices=SHARDINGS),
                **_SHAPE, "--reps": dict(default=5), "--device": {},
                "--passes": dict(nargs="+", default=["fwd"], choices=ring_bench.PASSES,
                                 help="fwd+bwd: each step's forward plus its backward step"),
            }, _check_ring),
    }


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The command line parser and the commands it parses, by name."""
    parser = _Parser(prog=PROG, description=__doc__,
                     epilog="`python -m workbench COMMAND --help` lists a command's options.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = _commands()
    for name, command in commands.items():
        p = sub.add_parser(name, help=command.help)
        for flags, settings in command.options.items():
            p.add_argument(*flags.split(), **{**_OPTIONS.get(flags, {}), **settings})
    return parser, commands


# ------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); returns its exit status or
    ends with one line on stderr as the module's docstring says."""
    prog = PROG
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        parser, commands = build_parser()
        args, extras = parser.parse_known_args(None if argv is None else list(argv))
        command = commands[args.command]
        prog = f"{PROG} {args.command}"
        if extras:
            _exit_with_error(prog, f"unrecognized arguments: {' '.join(extras)} "
                             f"(see {prog} --help)")
        try:
            _check_device(args, command.gpu_only)
            if command.writes:
                _check_data_dir(args.command)
            if command.check is not None:
                command.check(args)
            if command.needs is not None:
                _require_module(command.needs[0], args.command, command.needs[1])
        except UsageError as err:
            _exit_with_error(prog, str(err))
        try:
            return command.run(args)
        except BrokenPipeError:
            raise
        except (UsageError, *_USER_ERRORS) as err:
            if debug:
                raise
            lines = [line for line in str(err).splitlines() if line.strip()]
            first = lines[0] if lines else type(err).__name__
            _exit_with_error(prog, f"{first} (set {DEBUG_ENV}=1 for the traceback)")
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        sys.stderr.close()
        raise SystemExit(0) from None
