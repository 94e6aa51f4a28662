"""Command line: ``python -m workbench figures|bench ...``.

Examples::

    python -m workbench figures                 # run every notebook, check every figure
    python -m workbench figures --list          # notebooks and the figures they declare
    python -m workbench figures --only 02       # one notebook (name prefix)
    python -m workbench figures --profile smoke # a named parameter set of each notebook
    python -m workbench figures -p seq_len=1000 # override one parameter (JSON value)
    python -m workbench figures --check         # only check that declared figures exist
    python -m workbench figures --save-outputs  # also store the executed notebooks in notebooks/

    python -m workbench bench --study cpu_small --seq-lens 1024 2048     # CPU, small
    python -m workbench bench --study h100 --seq-lens 16384 65536 \
        --variants ours flex_natural sdpa_dense --backward              # a GPU study

    torchrun --standalone --nproc-per-node=2 -m workbench ring-demo     # distributed ring
    torchrun --standalone --nproc-per-node=2 -m workbench ring-bench --study cpu2 \
        --seq-lens 4096 --families causal local --shardings contiguous zigzag
    python -m workbench ring-plan --study h100 --world 2 --seq-lens 524288   # one GPU
    python -m workbench copy-bandwidth --study h100                      # roofline memory side
    python -m workbench bench-triton --study h200 --seq-len 65536   # kernel launch parameters
    python -m workbench triton-resources                 # kernels compiled offline for an H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"parameter override must be NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _figures(args: argparse.Namespace) -> int:
    from .figures import check_figures, discover, run_notebooks, select

    specs = select(discover(), args.only)
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
        missing = check_figures(specs)
    else:
        missing = run_notebooks(specs, profile=args.profile, overrides=dict(args.param or []),
                                save_outputs=args.save_outputs)
    if missing:
        print("declared figures not written:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    print(f"ok: {sum(len(s.figures) for s in specs)} figures from {len(specs)} notebooks")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, layout_build_time, run_bench
    from .records import write_csv

    cfg = BenchConfig(
        study=args.study, seq_lens=tuple(args.seq_lens), families=tuple(args.families),
        variants=tuple(args.variants), batch=args.batch, heads=args.heads,
        head_dim=args.head_dim, dtype=args.dtype, block_size=args.block_size, reps=args.reps,
        warmup=args.warmup, backward=args.backward, device=args.device or BenchConfig.device,
    )
    rows = run_bench(cfg)
    for r in rows:
        print(f"{r['seq_len']:>8} {r['family']:>9} {r['variant']:>13} {r['pass']:>8} "
              f"{r['ms']:>10} ms {r['useful_tflops']:>8} TFLOP/s {r['peak_mib']:>9} MiB "
              f"{r['status']}")
    if args.layout_timing:
        lay = []
        for s in args.layout_timing:
            lay += layout_build_time(s, cfg.block_size, cfg.families, cfg.heads, cfg.device)
        for r in lay:
            kernels = (f"; flex BlockMask {r['flex_mask_ms']} ms, triton plan "
                       f"{r['triton_plan_ms']} ms" if "flex_mask_ms" in r else "")
            print(f"layout {r['family']:>9} S={r['seq_len']} block={r['block_size']}: "
                  f"{r['build_ms']} ms, {r['layout_mib']} MiB{kernels}")
        write_csv(lay, f"bench_{cfg.study}_layout", cfg.device)
    return 0


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items() if k not in ("device", "torch", "date",
                                                                       "triton")))


def _bench_hilbert(args: argparse.Namespace) -> int:
    from .bench import hilbert_study
    from .records import write_csv

    rows = hilbert_study(args.grids, args.radii, reps=args.reps, device=args.device)
    _print_rows(rows)
    write_csv(rows, "03_hilbert_gpu", args.device)
    return 0


def _bench_adaptive(args: argparse.Namespace) -> int:
    from .bench import adaptive_cost_study
    from .records import write_csv

    rows = adaptive_cost_study(args.seq_lens, reps=args.reps, device=args.device)
    _print_rows(rows)
    write_csv(rows, "04_selection_cost_gpu", args.device)
    return 0


def _bench_longest(args: argparse.Namespace) -> int:
    from .bench import longest_sequence

    longest_sequence(args.families, start=args.start, limit=args.limit, device=args.device,
                     study=args.study, max_seconds=args.max_seconds, memory_gib=args.memory_gib)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="regenerate figures/ and data/ by running the notebooks")
    fig.add_argument("--list", action="store_true", help="list notebooks and declared figures")
    fig.add_argument("--only", nargs="+", metavar="NAME", help="notebook name prefixes to run")
    fig.add_argument("--profile", default=None, help="named parameter profile (default: none)")
    fig.add_argument("-p", "--param", action="append", type=_parse_override, metavar="NAME=VALUE",
                     help="override a notebook parameter (value parsed as JSON)")
    fig.add_argument("--check", action="store_true",
                     help="do not run; check that every declared figure exists")
    fig.add_argument("--save-outputs", action="store_true",
                     help="replace notebooks/*.ipynb with the executed ones (default parameters)")
    fig.set_defaults(func=_figures)
    from .bench import FAMILIES, VARIANTS

    ben = sub.add_parser("bench", help="time variants against baselines, write data/bench_*.csv")
    ben.add_argument("--study", required=True, help="name of the study (data/bench_<study>.csv)")
    ben.add_argument("--seq-lens", nargs="+", type=int, required=True)
    ben.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ben.add_argument("--variants", nargs="+", default=["ours", "sdpa_dense"], choices=VARIANTS)
    ben.add_argument("--batch", type=int, default=1)
    _shape_args(ben)
    ben.add_argument("--reps", type=int, default=20)
    ben.add_argument("--warmup", type=int, default=3)
    ben.add_argument("--backward", action="store_true", help="time forward+backward")
    ben.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ben.add_argument("--layout-timing", nargs="*", type=int, metavar="S",
                     help="also time building each family's block layout at these lengths")
    ben.set_defaults(func=_bench)

    hil = sub.add_parser("bench-hilbert", help="2-D neighbourhood attention: token and visit "
                         "orders on the GPU (data/03_hilbert_gpu.csv)")
    hil.add_argument("--grids", nargs="+", type=int, default=[128, 256])
    hil.add_argument("--radii", nargs="+", type=int, default=[4, 16])
    hil.add_argument("--reps", type=int, default=20)
    hil.add_argument("--device", default="cuda")
    hil.set_defaults(func=_bench_hilbert)

    ada = sub.add_parser("bench-adaptive", help="adaptive selection cost vs attention "
                         "(data/04_selection_cost_gpu.csv)")
    ada.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 65536])
    ada.add_argument("--reps", type=int, default=20)
    ada.add_argument("--device", default="cuda")
    ada.set_defaults(func=_bench_adaptive)
    lon = sub.add_parser("bench-longest", help="longest sequence one GPU runs per family "
                         "(doubling until out of memory; data/bench_<study>_longest.csv)")
    lon.add_argument("--study", default="h100")
    lon.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    lon.add_argument("--start", type=int, default=262144)
    lon.add_argument("--limit", type=int, default=1 << 24)
    lon.add_argument("--max-seconds", type=float, default=float("inf"),
                     help="do not run a length whose call is predicted to take longer (4x the "
                     "last); its row says whether its inputs would fit")
    lon.add_argument("--memory-gib", type=float, default=None,
                     help="search as on a card of this much memory (GiB, its total as CUDA "
                     "reports it): the allocator is capped so that it and the CUDA context fit")
    lon.add_argument("--device", default="cuda")
    lon.set_defaults(func=_bench_longest)
    cop = sub.add_parser("copy-bandwidth", help="device-to-device copy bandwidth, the memory "
                         "side of the roofline (data/bench_<study>_copy.csv)")
    cop.add_argument("--study", default="h100")
    cop.add_argument("--mib", type=int, default=1024)
    cop.add_argument("--reps", type=int, default=20)
    cop.add_argument("--device", default="cuda")
    cop.set_defaults(func=_copy_bandwidth)
    tri = sub.add_parser("bench-triton", help="our Triton kernel under every launch configuration "
                         "vs FlexAttention and dense SDPA (data/bench_<study>_triton_configs.csv)")
    tri.add_argument("--study", default="h200")
    tri.add_argument("--seq-len", type=int, default=65536)
    tri.add_argument("--families", nargs="+", default=["dense", "random10", "causal", "local"],
                     choices=FAMILIES)
    tri.add_argument("--space", choices=["launch", "features", "backward"], default="launch",
                     help="launch: tile edges, warps, stages; features: the best of those with "
                          "and without TMA (data/bench_<study>_triton_features.csv); backward: "
                          "forward+backward under the backward kernels' launch parameters "
                          "(data/bench_<study>_triton_backward.csv)")
    tri.add_argument("--reps", type=int, default=20)
    tri.add_argument("--device", default="cuda")
    tri.set_defaults(func=_bench_triton)
    res = sub.add_parser("triton-resources", help="our Triton kernels compiled offline for a "
                         "GPU (no GPU needed): shared memory, registers, spills of every default "
                         "and swept configuration (data/triton_resources_<study>.csv)")
    res.add_argument("--study", default="sm90")
    res.add_argument("--head-dims", nargs="+", type=int, default=[64, 128, 256])
    res.add_argument("--capability", nargs=2, type=int, default=[9, 0], metavar=("MAJOR", "MINOR"))
    res.set_defaults(func=_triton_resources)
    _ring_commands(sub, FAMILIES)
    args = parser.parse_args(argv)
    return args.func(args)


def _shape_args(p: argparse.ArgumentParser, *, heads: int = 16, head_dim: int = 128,
                block_size: int = 128, dtype: bool = True) -> None:
    """The attention shape options shared by the benchmark commands."""
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--head-dim", type=int, default=head_dim)
    if dtype:
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--block-size", type=int, default=block_size)


def _ring_commands(sub, families: tuple[str, ...]) -> None:
    from .distributed import SHARDINGS

    demo = sub.add_parser("ring-demo", help="distributed ring vs one process, on every rank "
                          "(run under torchrun)")
    demo.add_argument("--seq-len", type=int, default=1000)
    _shape_args(demo, heads=4, head_dim=32, block_size=64, dtype=False)  # float64 check
    demo.add_argument("--families", nargs="+", default=["causal", "local", "random10", "dilated"],
                      choices=families)
    demo.add_argument("--sharding", default="zigzag", choices=SHARDINGS)
    demo.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds before a missing "
                      "peer is reported")
    demo.set_defaults(func=_ring_demo)

    rb = sub.add_parser("ring-bench", help="time the distributed ring (run under torchrun); "
                        "writes data/ring_<study>.csv")
    rb.add_argument("--study", required=True)
    rb.add_argument("--seq-lens", nargs="+", type=int, required=True,
                    help="total sequence lengths (all ranks together)")
    rb.add_argument("--families", nargs="+", default=["causal", "local"], choices=families)
    rb.add_argument("--shardings", nargs="+", default=["contiguous"], choices=SHARDINGS)
    _shape_args(rb)
    rb.add_argument("--reps", type=int, default=10)
    rb.add_argument("--warmup", type=int, default=2)
    rb.add_argument("--backward", action="store_true")
    rb.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    rb.add_argument("--timeout", type=float, default=600.0, help="seconds before a rank that "
                    "stopped answering (e.g. out of memory) is reported")
    rb.add_argument("--double-until", type=int, default=None, metavar="S_MAX",
                    help="longest-sequence search: double the first --seq-lens value until a "
                         "case fails (out of memory) or S_MAX")
    rb.add_argument("--baseline", action="store_true",
                    help="after each case, run rank 0 alone at the per-rank length and record "
                         "the parallel efficiency")
    rb.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile one more call per case and write its N most expensive "
                         "operators per rank to data/ring_<study>_profile.csv")
    rb.set_defaults(func=_ring_bench)

    rp = sub.add_parser("ring-plan", help="per-(rank, step) compute and bytes of a ring, run on "
                        "one device; writes data/ring_<study>_plan.csv")
    rp.add_argument("--study", required=True)
    rp.add_argument("--world", type=int, default=2)
    rp.add_argument("--seq-lens", nargs="+", type=int, required=True)
    rp.add_argument("--families", nargs="+", default=["causal", "random10", "local", "dilated"],
                    choices=families)
    rp.add_argument("--shardings", nargs="+", default=list(SHARDINGS), choices=SHARDINGS)
    _shape_args(rp)
    rp.add_argument("--reps", type=int, default=5)
    rp.add_argument("--device", default="cuda")
    rp.add_argument("--passes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"],
                    help="fwd+bwd: each step's forward plus its backward step")
    rp.set_defaults(func=_ring_plan)


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


if __name__ == "__main__":
    sys.exit(main())
