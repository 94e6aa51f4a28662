"""``python -m workbench``: the command line of :mod:`workbench.lab.cli`."""

from .lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
