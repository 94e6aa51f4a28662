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
import json
import keyword
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

PROG = "workbench"
DEBUG_ENV = "WORKBENCH_DEBUG"
_USER_ERRORS = (ValueError, TypeError, NotImplementedError, RuntimeError, OSError)
"""Errors from the library that :func:`main` reports as one line (a value it cannot use)."""


class UsageError(Exception):
    """A value a command cannot use on this machine or with the other options given; the message
    names the option and what to use instead."""


# ------------------------------------------------------------------------ argument types
def _shown(text: str) -> str:
    """``text`` as an error message shows it: bare, or quoted when it is blank."""
    return text if text.strip() else repr(text)


def _int_at_least(text: str, minimum: int, what: str) -> int:
    """``text`` as an int ``>= minimum``; otherwise an argparse error "<text> is not <what>"."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not {what}")
    return value


def positive_int(text: str) -> int:
    """``text`` as an int ``>= 1`` (argparse ``type=``)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """``text`` as an int ``>= 0`` (argparse ``type=``)."""
    return _int_at_least(text, 0, "a non-negative integer")


def power_of_two_head_dim(text: str) -> int:
    """``text`` as a power of two ``>= 16``, a head width the Triton kernels take."""
    value = _int_at_least(text, 16, "a power of two >= 16 (the Triton kernels' head widths)")
    if value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"{value} is not a power of two >= 16 (the Triton kernels' head widths)")
    return value


def _positive(text: str, inf: bool) -> float:
    """``text`` as a float ``> 0``, finite unless ``inf``; otherwise an argparse error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf or (inf and value == math.inf)):
        what = "a positive number (or inf)" if inf else "a positive finite number"
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not {what}")
    return value


def positive_float(text: str) -> float:
    """``text`` as a finite float ``> 0`` (argparse ``type=``)."""
    return _positive(text, inf=False)


def positive_float_or_inf(text: str) -> float:
    """``text`` as a float ``> 0``, ``inf`` included (argparse ``type=``)."""
    return _positive(text, inf=True)


def _matching(regex: str, what: str) -> Callable[[str], str]:
    """An argparse ``type=`` that takes a text matching ``regex`` whole, else "is not <what>"."""
    pattern = re.compile(regex)

    def check(text: str) -> str:
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{_shown(text)} is not {what}")
        return text

    return check


device = _matching(r"cpu|cuda(:[0-9]+)?", "a device: use cpu, cuda or cuda:N")
cuda_device = _matching(r"cuda(:[0-9]+)?",
                        "a CUDA device; this command measures a GPU: use cuda or cuda:N")
study_name = _matching(r"[A-Za-z0-9][A-Za-z0-9_-]*", "a study name: use letters, digits, '_' "
                       "and '-' (it names the data/ file), e.g. cpu_small")


def _parse_override(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` as ``(NAME, VALUE)``: the value parsed as JSON, else kept as a string;
    ``NAME`` must be a Python name (a notebook parameter)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or keyword.iskeyword(name):
        raise argparse.ArgumentTypeError(
            f"{_shown(text)} is not NAME=VALUE with NAME a notebook parameter, e.g. "
            "seq_len=1000")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


# ------------------------------------------------------------------------ one-line errors
class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, ``<prog>: error: <message>``
    with the option first, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        if message.startswith("the following arguments are required"):
            message += f" (see {self.prog} --help)"
        _exit_with_error(self.prog, message, 2)


def _exit_with_error(prog: str, message: str, status: int) -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with ``status``."""
    text = " ".join(message.split())  # one line, whatever the message's layout
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _first_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s message (its type's name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _debug() -> bool:
    """Whether ``WORKBENCH_DEBUG`` asks for tracebacks (set, and neither empty nor ``0``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------ checks before work
def _check_device(args: argparse.Namespace) -> None:
    """``--device`` exists on this machine: CUDA is there when asked for (always, for a command
    that measures a GPU) and ``cuda:N`` is one of its devices."""
    import torch

    dev = getattr(args, "device", None)
    if dev is None or dev == "cpu":
        return
    if not torch.cuda.is_available():
        if args.gpu_only:
            raise UsageError(f"{args.command} measures a CUDA GPU and this machine has none: "
                             "run it on a machine with one")
        raise UsageError(f"--device {dev} needs a CUDA GPU; this machine has none: use "
                         "--device cpu")
    index, count = int(dev.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {dev}: this machine has {count} CUDA device(s): use cuda:0"
                         + (f" to cuda:{count - 1}" if count > 1 else ""))


def _check_data_dir(args: argparse.Namespace) -> None:
    """A command that records rows has a folder to write them to (the project's ``data/``, or
    ``$WORKBENCH_DATA_DIR``) before its work starts."""
    if args.command in ("figures", "ring-demo"):  # figures finds its project itself
        return
    from ..project import ProjectNotFoundError, data_dir

    try:
        data_dir()
    except ProjectNotFoundError as err:
        raise UsageError(f"{args.command} writes its rows to a project's data/ and found none: "
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
        for cell in cells:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                source = cell["source"]
                tree = ast.parse(source if isinstance(source, str) else "".join(source))
                return {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                        for t in node.targets if isinstance(t, ast.Name)} | {
                    node.target.id for node in ast.walk(tree)
                    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    except (OSError, KeyError, ValueError, SyntaxError):
        return None
    return None


def _check_figures(args: argparse.Namespace) -> None:
    """The project is found (``--root``, ``$WORKBENCH_ROOT`` or the working directory) and has
    notebooks; ``--only`` prefixes each match a notebook; when notebooks run: papermill is
    installed, every chosen notebook has ``--profile``, every ``-p`` name is a parameter of one of
    them, and ``--save-outputs`` comes with the default parameters. ``args.root`` becomes the
    project's resolved path."""
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
    names = ", ".join(s.name for s in specs)
    for prefix in args.only or []:
        if not any(s.name.startswith(prefix) for s in specs):
            raise UsageError(f"--only {prefix}: no notebook name starts with it; notebooks: "
                             f"{names}")
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
    """Every requested variant runs for at least one requested family on the device (a
    variant that never applies would leave no rows and no word about it), and every family's
    pattern builds with ``--heads``."""
    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = dev == "cpu"
    if "triton" in args.variants and on_cpu:
        raise UsageError("--variants triton: our Triton kernels run on CUDA only: drop it, or "
                         "use --device cuda on a GPU machine")
    from .bench import longnet_families

    strided = [v for v in args.variants if v in ("strided_view", "strided_gather", "paper")]
    if strided and not set(args.families) & set(longnet_families()):
        raise UsageError(f"--variants {strided[0]} applies to the dilated families only: add "
                         f"{' or '.join(longnet_families())} to --families, or drop it")
    if "flex_natural" in args.variants and args.backward and on_cpu:
        raise UsageError("--variants flex_natural: FlexAttention has no CPU backward: drop "
                         "--backward or flex_natural, or use --device cuda on a GPU machine")
    if not args.seq_lens and not args.layout_timing:
        raise UsageError("bench needs --seq-lens (attention timings), --layout-timing (layout "
                         "build timings) or both")
    _check_patterns(args.families, args.seq_lens or (), args.heads)


def _check_patterns(families: Sequence[str], seq_lens: Sequence[int], heads: int) -> None:
    """Every family's pattern can be built at every length with ``heads`` heads (the dilated
    families need a head per (segment, dilation) pair)."""
    from .bench import family_pattern

    for family in families:
        for s in seq_lens:
            try:
                family_pattern(family, s, heads)
            except (ValueError, TypeError) as err:
                raise UsageError(f"--heads {heads} with --families {family}: {err}") from None


def _overhead_shape(args: argparse.Namespace) -> dict:
    """``bench-overhead``'s device, lengths and heads: those given, else its defaults for the
    device (CUDA when present)."""
    import torch

    from .overhead import DEFAULTS

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = DEFAULTS["cuda" if dev.startswith("cuda") else "cpu"]
    return {"device": dev, "seq_lens": args.seq_lens or list(shape["seq_lens"]),
            "heads": args.heads or shape["heads"]}


def _check_overhead(args: argparse.Namespace) -> None:
    """The entry points' patterns build at every length with ``--heads`` (LongNet's pairs need a
    head each)."""
    shape = _overhead_shape(args)
    families = ["random10"] + (["dilated"] if any(e.startswith("dilated")
                                                  for e in args.entry_points) else [])
    _check_patterns(families, shape["seq_lens"], shape["heads"])


def _check_longest(args: argparse.Namespace) -> None:
    """``--limit`` leaves at least ``--start`` to run."""
    if args.limit < args.start:
        raise UsageError(f"--limit {args.limit} is below --start {args.start}: nothing would "
                         "run; raise --limit or lower --start")


def _check_bench_triton(args: argparse.Namespace) -> None:
    """Triton is installed."""
    _require_module("triton", "bench-triton", "install a CUDA build of torch (it brings triton)")


def _check_triton_resources(args: argparse.Namespace) -> None:
    """Triton is installed and ``--capability`` is a GPU whose shared memory limit is known."""
    _require_module("triton", "triton-resources", "pip install triton")
    from .triton_resources import SHARED_LIMIT

    if tuple(args.capability) not in SHARED_LIMIT:
        known = ", ".join(f"{a} {b}" for a, b in SHARED_LIMIT)
        raise UsageError(f"--capability {args.capability[0]} {args.capability[1]}: no shared "
                         f"memory limit is known for it; use one of: {known}")


def _check_shards(option: str, seq_lens: Sequence[int], world: int, block_size: int,
                  shardings: Sequence[str], ranks: str) -> None:
    """Every length (the values of ``option``) splits into whole ``block_size`` blocks over
    ``world`` ranks under every sharding; ``ranks`` says where the rank count comes from."""
    from ..sharding import shard_plan

    for s in seq_lens:
        for kind in shardings:
            try:
                shard_plan(s, world, block_size, kind)
            except (ValueError, TypeError) as err:
                raise UsageError(f"{option} {s} with --block-size {block_size} and {ranks}: "
                                 f"{err}") from None


def _torchrun_world() -> int:
    """The number of ranks of the ring the ring commands join: torchrun's ``WORLD_SIZE`` under
    torchrun (``RANK`` set), else 1."""
    if "RANK" not in os.environ:
        return 1
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _check_ring(args: argparse.Namespace) -> int:
    """Every family's pattern builds with ``--heads`` and every length shards over the ranks
    (``--world``, else torchrun's), whose number it returns; ``--backend`` can run here."""
    import torch

    if getattr(args, "backend", None) == "nccl" and not torch.cuda.is_available():
        raise UsageError("--backend nccl needs CUDA GPUs; this machine has none: use "
                         "--backend gloo")
    option, seq_lens = (("--seq-len", [args.seq_len]) if hasattr(args, "seq_len")
                        else ("--seq-lens", args.seq_lens))
    world = getattr(args, "world", None) or _torchrun_world()
    _check_patterns(args.families, seq_lens, args.heads)
    _check_shards(option, seq_lens, world, args.block_size,
                  getattr(args, "shardings", None) or [args.sharding],
                  f"--world {world}" if hasattr(args, "world") else f"{world} rank(s)")
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
def _figures(args: argparse.Namespace) -> int:
    from .figures import check_figures, discover, run_notebooks, select

    specs = select(discover(args.root), args.only)
    if args.list:
        for spec in specs:
            profiles = ", ".join(["default", *spec.profiles])
            print(f"{spec.name}  (profiles: {profiles})")
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
    from .bench import BenchConfig, layout_build_time, run_bench
    from .records import write_csv

    device = args.device or BenchConfig.device
    if args.seq_lens:
        cfg = BenchConfig(
            study=args.study, seq_lens=tuple(args.seq_lens), families=tuple(args.families),
            variants=tuple(args.variants), batch=args.batch, heads=args.heads,
            head_dim=args.head_dim, dtype=args.dtype, block_size=args.block_size,
            reps=args.reps, warmup=args.warmup, backward=args.backward,
            grad_forward=args.grad_forward, device=device,
        )
        for r in run_bench(cfg):
            print(f"{r['seq_len']:>8} {r['family']:>9} {r['variant']:>13} {r['pass']:>8} "
                  f"{r['ms']:>10} ms {r['useful_tflops']:>8} TFLOP/s {r['peak_mib']:>9} MiB "
                  f"{r['status']}")
    if args.layout_timing:
        lay = []
        for s in args.layout_timing:
            lay += layout_build_time(
                s, args.block_size, args.families, args.layout_heads or [args.heads], device,
                cells=args.layout_cells or (), reps=args.reps,
                max_seconds=args.layout_max_seconds, max_gib=args.layout_max_gib,
                progress=True)
        for r in lay:
            cell = "" if r["cell"] is None else f" cell={r['cell']}"
            took = (f": layout {r['build_ms']} ms, flex BlockMask {r.get('flex_mask_ms')} ms, "
                    f"triton plan {r.get('triton_plan_ms')} ms" if "build_ms" in r else "")
            print(f"layout {r['family']:>9} heads={r['heads']}{cell} S={r['seq_len']} "
                  f"block={r['block_size']}{took} [{r['status']}]")
        write_csv(lay, f"bench_{args.study}_layout" if args.seq_lens else f"layouts_{args.study}",
                  device)
    return 0


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items() if k not in ("device", "torch", "date",
                                                                       "triton")))


def _print_and_write(rows: list[dict], name: str, device: str) -> int:
    from .records import write_csv

    _print_rows(rows)
    write_csv(rows, name, device)
    return 0


def _bench_hilbert(args: argparse.Namespace) -> int:
    from .bench import hilbert_study

    return _print_and_write(hilbert_study(args.grids, args.radii, reps=args.reps,
                                          device=args.device), "03_hilbert_gpu", args.device)


def _bench_adaptive(args: argparse.Namespace) -> int:
    from .bench import adaptive_cost_study

    return _print_and_write(adaptive_cost_study(args.seq_lens, reps=args.reps,
                                                device=args.device),
                            "04_selection_cost_gpu", args.device)


def _bench_longest(args: argparse.Namespace) -> int:
    from .bench import longest_sequence

    longest_sequence(args.families, start=args.start, limit=args.limit, device=args.device,
                     backward=args.backward, study=args.study, max_seconds=args.max_seconds,
                     memory_gib=args.memory_gib)
    return 0


def _bench_triton(args: argparse.Namespace) -> int:
    from .bench import kernel_configs, triton_config_study

    name = "configs" if args.space == "launch" else args.space
    rows = triton_config_study(args.seq_len, args.families, reps=args.reps, device=args.device,
                               configs=kernel_configs(args.space),
                               backward=args.space == "backward",
                               csv_name=f"bench_{args.study}_triton_{name}")
    _print_rows(rows)
    return 0


def _bench_overhead(args: argparse.Namespace) -> int:
    from .overhead import overhead_study

    rows = overhead_study(args.study, **_overhead_shape(args), entry_points=args.entry_points,
                          head_dim=args.head_dim, dtype=args.dtype, block_size=args.block_size,
                          reps=args.reps, warmup=args.warmup)
    for r in rows:
        print(f"{r['seq_len']:>6} {r['entry_point']:>19} {r['backend']:>9}  ours {r['ours_us']:>9} "
              f"us  kernel {r['kernel_us']:>9} us  overhead {r['overhead_us']:>8} us "
              f"(CPU time {r['cpu_overhead_us']:>8} us)")
    return 0


def _triton_resources(args: argparse.Namespace) -> int:
    from .bench import triton_resource_study
    from .records import write_csv

    rows = triton_resource_study(args.head_dims, capability=tuple(args.capability))
    for r in rows:
        print(f"{r['kernel']:>8} d={r['head_dim']:<3} {r['space']:>8} {r['block_m']}x"
              f"{r['block_n']} w{r['num_warps']} s{r['num_stages']} tma={r['use_tma']!s:<5} "
              f"{r['shared_bytes'] / 1024:7.1f} KiB {'fits' if r['fits'] else 'TOO BIG'} "
              f"{r['registers']} regs {r['spill_bytes']} B spilled")
    write_csv(rows, f"triton_resources_{args.study}", "cpu")
    return 0


def _copy_bandwidth(args: argparse.Namespace) -> int:
    from .bench import copy_bandwidth
    from .records import environment, write_csv

    env = environment(args.device)
    rows = [{**env, **r} for r in copy_bandwidth(args.device, args.mib, args.reps)]
    print(f"copy bandwidth: {rows[0]['gb_s']} GB/s (read + write)")
    write_csv(rows, f"bench_{args.study}_copy", args.device)
    return 0


def _ring_demo(a: argparse.Namespace) -> int:
    from .ring_bench import ring_demo

    rows = ring_demo(a.seq_len, a.heads, a.head_dim, a.block_size, a.families, a.sharding,
                     a.backend, a.timeout)
    return 0 if all(r["max_abs_error"] <= r["tolerance"] for r in rows) else 1


def _ring_bench(a: argparse.Namespace) -> int:
    from .ring_bench import ring_bench

    rows = ring_bench(a.study, a.seq_lens, a.families, a.shardings, a.heads, a.head_dim,
                      a.dtype, a.block_size, a.reps, a.warmup, a.backward, a.backend, a.timeout,
                      a.double_until, a.profile, a.baseline)
    if all(r["status"] == "ok" for r in rows):
        return 0
    # A case failed: the data-plane group may hold unmatched transfers, which can abort a
    # normal interpreter exit. Every row is written; end here. A longest-sequence search is
    # meant to end at its first failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if a.double_until is not None else 1)


def _ring_plan(a: argparse.Namespace) -> int:
    from .ring_bench import ring_plan_study

    rows = ring_plan_study(a.study, a.seq_lens, a.families, a.world, a.shardings, a.heads,
                           a.head_dim, a.dtype, a.block_size, a.reps, a.device, a.passes)
    _print_rows(rows)
    return 0


# ------------------------------------------------------------------------ the parser
_EPILOG = "`python -m workbench COMMAND --help` lists a command's options."


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line parser and each command's own parser, by command name."""
    from .bench import bench_families

    parser = _Parser(prog=PROG, description=__doc__, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _figures_command(sub)
    _bench_commands(sub, bench_families())
    _ring_commands(sub, bench_families())
    return parser, dict(sub.choices)


def _figures_command(sub) -> None:
    fig = sub.add_parser("figures", help="rerun the notebooks, which write figures/ and data/")
    fig.add_argument("--root", type=Path, default=None, metavar="PATH",
                     help="the project (default: $WORKBENCH_ROOT, else the nearest folder with "
                          "pyproject.toml and notebooks/ at or above the working directory)")
    fig.add_argument("--list", action="store_true", help="list notebooks and declared figures")
    fig.add_argument("--only", nargs="+", metavar="NAME", help="notebook name prefixes to run")
    fig.add_argument("--profile", default=None, help="named parameter profile (default: none)")
    fig.add_argument("-p", "--param", action="append", type=_parse_override, metavar="NAME=VALUE",
                     help="override a notebook parameter (value parsed as JSON)")
    fig.add_argument("--check", action="store_true",
                     help="do not run; check that every declared figure exists")
    fig.add_argument("--save-outputs", action="store_true",
                     help="replace notebooks/*.ipynb with the executed ones (default parameters)")
    fig.set_defaults(func=_figures, validate=_check_figures)


def _device_arg(p: argparse.ArgumentParser, default: str | None = "cuda", *,
                gpu_only: bool = False) -> None:
    """``--device``: cpu, cuda or cuda:N (cuda only, for a command that measures a GPU)."""
    if gpu_only:
        p.add_argument("--device", type=cuda_device, default=default, metavar="cuda[:N]",
                       help=f"the CUDA device to measure (default: {default})")
    else:
        p.add_argument("--device", type=device, default=default, metavar="{cpu,cuda,cuda:N}",
                       help=f"where to run (default: {default or 'cuda if present, else cpu'})")
    p.set_defaults(gpu_only=gpu_only)


def _shape_args(p: argparse.ArgumentParser, *, heads: int = 16, head_dim: int = 128,
                block_size: int = 128, dtype: bool = True) -> None:
    """The attention shape options shared by the benchmark commands."""
    p.add_argument("--heads", type=positive_int, default=heads)
    p.add_argument("--head-dim", type=positive_int, default=head_dim)
    if dtype:
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--block-size", type=positive_int, default=block_size)


def _study_arg(p: argparse.ArgumentParser, output: str, default: str | None = None) -> None:
    """``--study``: the name in the output file ``data/<output>.csv``."""
    p.add_argument("--study", type=study_name, required=default is None, default=default,
                   help=f"writes data/{output}.csv" + (f" (default: {default})" if default else ""))


def _families_arg(p: argparse.ArgumentParser, families: tuple[str, ...],
                  default: Sequence[str]) -> None:
    """``--families``: pattern families by name, one of ``families`` each."""
    p.add_argument("--families", nargs="+", default=list(default), choices=families,
                   metavar="NAME", help=f"from: {', '.join(families)} (default: "
                   f"{' '.join(default)})")


def _transport_args(p: argparse.ArgumentParser, timeout: float) -> None:
    """``--backend`` and ``--timeout`` of the commands that join a process group."""
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    p.add_argument("--timeout", type=positive_float, default=timeout,
                   help="seconds before a silent rank is reported")


def _seq_lens_arg(p: argparse.ArgumentParser, **kw) -> None:
    p.add_argument("--seq-lens", nargs="+", type=positive_int, metavar="S", **kw)


def _reps_arg(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--reps", type=positive_int, default=default,
                   help=f"timed calls; the median is recorded (default: {default})")


def _bench_commands(sub, families: tuple[str, ...]) -> None:
    from .bench import DEFAULT_FAMILIES, VARIANTS

    ben = sub.add_parser("bench", help="time variants against baselines per family and length")
    _study_arg(ben, "bench_<study>")
    _seq_lens_arg(ben, help="lengths to time attention at (leave out to time layouts alone)")
    _families_arg(ben, families, DEFAULT_FAMILIES)
    ben.add_argument("--variants", nargs="+", default=["ours", "sdpa_dense"], choices=VARIANTS,
                     metavar="NAME", help=f"from: {', '.join(VARIANTS)} (default: ours "
                     "sdpa_dense; ours is what backend='auto' runs)")
    ben.add_argument("--batch", type=positive_int, default=1)
    _shape_args(ben)
    _reps_arg(ben, 20)
    ben.add_argument("--warmup", type=nonnegative_int, default=3)
    passes = ben.add_mutually_exclusive_group()
    passes.add_argument("--backward", action="store_true", help="time forward+backward")
    passes.add_argument("--grad-forward", action="store_true",
                        help="time the forward of inputs that require grad")
    _device_arg(ben, None)
    ben.add_argument("--layout-timing", nargs="*", type=positive_int, metavar="S",
                     help="time building each family's block layout and kernel structures at "
                     "these lengths (the median of --reps); writes data/bench_<study>_layout.csv, "
                     "or data/layouts_<study>.csv without --seq-lens")
    ben.add_argument("--layout-heads", nargs="+", type=positive_int, metavar="H",
                     help="head counts of the layout timing (default: --heads)")
    ben.add_argument("--layout-cells", nargs="+", type=positive_int, metavar="C",
                     help="cell sizes of the layout timing, for families with a cell argument "
                     "(default: their own)")
    ben.add_argument("--layout-max-seconds", type=positive_float_or_inf, default=math.inf,
                     help="skip a layout case predicted to take longer per build")
    ben.add_argument("--layout-max-gib", type=positive_float_or_inf, default=math.inf,
                     help="skip a layout case (or a triton plan) that would need more memory")
    ben.set_defaults(func=_bench, validate=_check_bench)

    hil = sub.add_parser("bench-hilbert", help="2-D neighbourhood attention per token and visit "
                         "order; writes data/03_hilbert_gpu.csv")
    hil.add_argument("--grids", nargs="+", type=positive_int, default=[128, 256], metavar="G",
                     help="grid sides (G x G tokens)")
    hil.add_argument("--radii", nargs="+", type=nonnegative_int, default=[4, 16], metavar="R")
    _reps_arg(hil, 20)
    _device_arg(hil)
    hil.set_defaults(func=_bench_hilbert)

    ada = sub.add_parser("bench-adaptive", help="adaptive selection's cost against its attention; "
                         "writes data/04_selection_cost_gpu.csv")
    _seq_lens_arg(ada, default=[16384, 65536])
    _reps_arg(ada, 20)
    _device_arg(ada)
    ada.set_defaults(func=_bench_adaptive)

    lon = sub.add_parser("bench-longest", help="the longest sequence one GPU runs, per family")
    _study_arg(lon, "bench_<study>_longest", "h100")
    _families_arg(lon, families, DEFAULT_FAMILIES)
    lon.add_argument("--start", type=positive_int, default=262144)
    lon.add_argument("--limit", type=positive_int, default=1 << 24)
    lon.add_argument("--max-seconds", type=positive_float_or_inf, default=math.inf,
                     help="skip a length predicted (4x the last) to take longer")
    lon.add_argument("--backward", action="store_true",
                     help="forward+backward (default: forward)")
    lon.add_argument("--memory-gib", type=positive_float, default=None,
                     help="search as on a card of this much memory (GiB, as CUDA reports it)")
    _device_arg(lon, gpu_only=True)
    lon.set_defaults(func=_bench_longest, validate=_check_longest)

    cop = sub.add_parser("copy-bandwidth", help="device copy bandwidth (the roofline's memory "
                         "side)")
    _study_arg(cop, "bench_<study>_copy", "h100")
    cop.add_argument("--mib", type=positive_int, default=1024)
    _reps_arg(cop, 20)
    _device_arg(cop)
    cop.set_defaults(func=_copy_bandwidth)

    tri = sub.add_parser("bench-triton", help="our Triton kernels under each launch configuration")
    _study_arg(tri, "bench_<study>_triton_*", "h200")
    tri.add_argument("--seq-len", type=positive_int, default=65536)
    _families_arg(tri, families, ["dense", "random10", "causal", "local"])
    tri.add_argument("--space", choices=["launch", "features", "backward"], default="launch",
                     help="launch: tile edges, warps, stages; features: with and without TMA; "
                          "backward: the backward kernels' parameters")
    _reps_arg(tri, 20)
    _device_arg(tri, gpu_only=True)
    tri.set_defaults(func=_bench_triton, validate=_check_bench_triton)

    from .overhead import ENTRY_POINTS

    ovh = sub.add_parser("bench-overhead", help="per-call time of every entry point against the "
                         "kernel it launches")
    _study_arg(ovh, "overhead_<study>")
    _seq_lens_arg(ovh, default=None, help="default: 512 to 8192 on CUDA, 256 to 1024 on the CPU")
    ovh.add_argument("--entry-points", nargs="+", default=list(ENTRY_POINTS),
                     choices=ENTRY_POINTS)
    ovh.add_argument("--heads", type=positive_int, default=None,
                     help="default: 16 on CUDA, 4 on the CPU")
    ovh.add_argument("--head-dim", type=positive_int, default=None,
                     help="default: 128 on CUDA, 32 on the CPU")
    ovh.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                     help="default: bf16 on CUDA, fp32 on the CPU")
    ovh.add_argument("--block-size", type=positive_int, default=None,
                     help="default: 128 on CUDA, 64 on the CPU")
    _reps_arg(ovh, 200)
    ovh.add_argument("--warmup", type=nonnegative_int, default=20)
    _device_arg(ovh, None)
    ovh.set_defaults(func=_bench_overhead, validate=_check_overhead)

    res = sub.add_parser("triton-resources", help="shared memory and registers of our Triton "
                         "kernels, compiled offline (no GPU needed)")
    _study_arg(res, "triton_resources_<study>", "sm90")
    res.add_argument("--head-dims", nargs="+", type=power_of_two_head_dim, default=[64, 128, 256],
                     metavar="D", help="head widths: powers of two >= 16")
    res.add_argument("--capability", nargs=2, type=nonnegative_int, default=[9, 0],
                     metavar=("MAJOR", "MINOR"), help="compute capability of the target GPU")
    res.set_defaults(func=_triton_resources, validate=_check_triton_resources)


def _ring_commands(sub, families: tuple[str, ...]) -> None:
    from ..distributed import SHARDINGS
    from .ring_bench import PASSES

    demo = sub.add_parser("ring-demo", help="check the distributed ring against one process "
                          "(torchrun)")
    demo.add_argument("--seq-len", type=positive_int, default=1000)
    _shape_args(demo, heads=4, head_dim=32, block_size=64, dtype=False)  # float64 check
    _families_arg(demo, families, ["causal", "local", "random10", "dilated"])
    demo.add_argument("--sharding", default="zigzag", choices=SHARDINGS)
    _transport_args(demo, timeout=120.0)
    demo.set_defaults(func=_ring_demo, validate=_check_ring)

    rb = sub.add_parser("ring-bench", help="time the distributed ring (torchrun)")
    _study_arg(rb, "ring_<study>")
    _seq_lens_arg(rb, required=True, help="total sequence lengths (all ranks together)")
    _families_arg(rb, families, ["causal", "local"])
    rb.add_argument("--shardings", nargs="+", default=["contiguous"], choices=SHARDINGS)
    _shape_args(rb)
    _reps_arg(rb, 10)
    rb.add_argument("--warmup", type=nonnegative_int, default=2)
    rb.add_argument("--backward", action="store_true")
    _transport_args(rb, timeout=600.0)
    rb.add_argument("--double-until", type=positive_int, default=None, metavar="S_MAX",
                    help="double the --seq-lens value until a case fails or S_MAX")
    rb.add_argument("--baseline", action="store_true",
                    help="also run rank 0 alone at the per-rank length (parallel efficiency)")
    rb.add_argument("--profile", type=nonnegative_int, default=0, metavar="N",
                    help="profile one call per case: its N costliest operators per rank, to "
                         "data/ring_<study>_profile.csv")
    rb.set_defaults(func=_ring_bench, validate=_check_ring_bench)

    rp = sub.add_parser("ring-plan", help="each (rank, step) of a ring, run on one device")
    _study_arg(rp, "ring_<study>_plan")
    rp.add_argument("--world", type=positive_int, default=2)
    _seq_lens_arg(rp, required=True)
    _families_arg(rp, families, ["causal", "random10", "local", "dilated"])
    rp.add_argument("--shardings", nargs="+", default=list(SHARDINGS), choices=SHARDINGS)
    _shape_args(rp)
    _reps_arg(rp, 5)
    _device_arg(rp)
    rp.add_argument("--passes", nargs="+", default=["fwd"], choices=PASSES,
                    help="fwd+bwd: each step's forward plus its backward step")
    rp.set_defaults(func=_ring_plan, validate=_check_ring)


# ------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); returns its exit status.

    A value the command cannot use ends it with one line on stderr,
    ``workbench <command>: error: <message>``, and ``SystemExit(2)``: before any work when the
    arguments, the other options or this machine say so, else when the work raises one of
    ``ValueError``, ``TypeError``, ``NotImplementedError``, ``RuntimeError`` or ``OSError``.
    Ctrl-C ends it with one line and ``SystemExit(130)``. With ``WORKBENCH_DEBUG=1`` an error
    raised by the work, and the interrupt, propagate with their traceback instead.
    """
    prog = PROG
    try:
        parser, commands = build_parser()
        args, extras = parser.parse_known_args(None if argv is None else list(argv))
        command = commands[args.command]
        prog = command.prog
        if extras:
            command.error(f"unrecognized arguments: {' '.join(extras)} (see {prog} --help)")
        try:
            _check_device(args)
            _check_data_dir(args)
            validate = getattr(args, "validate", None)
            if validate is not None:
                validate(args)
        except UsageError as err:
            command.error(str(err))
        return _run(args, prog)
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        sys.stderr.close()
        raise SystemExit(0) from None


def _run(args: argparse.Namespace, prog: str) -> int:
    """``args.func(args)``, with the errors :func:`main` reports as one line reported so."""
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except (UsageError, *_USER_ERRORS) as err:
        if _debug():
            raise
        _exit_with_error(prog, f"{_first_line(err)} (set {DEBUG_ENV}=1 for the traceback)", 2)


if __name__ == "__main__":
    sys.exit(main())
