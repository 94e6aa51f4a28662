"""Command line: ``python -m workbench figures ...``.

Examples::

    python -m workbench figures                 # run every notebook, check every figure
    python -m workbench figures --list          # notebooks and the figures they declare
    python -m workbench figures --only 02       # one notebook (name prefix)
    python -m workbench figures --profile smoke # a named parameter set of each notebook
    python -m workbench figures -p seq_len=1000 # override one parameter (JSON value)
    python -m workbench figures --check         # only check that declared figures exist
    python -m workbench figures --save-outputs  # also store the executed notebooks in notebooks/
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
