"""The ``scale-scvi`` command: cluster a single-cell ATAC-seq dataset in one run.

Reads a peak matrix (``.h5ad``, 10x ``.h5``, a 10x-style folder or an ``.h5mu``), filters
cells and peaks with :mod:`scale_scvi.pp`, trains :class:`~scale_scvi.SCALE` with the
library's defaults for every option not given, saves the model, and writes an output folder
with the annotated AnnData and figures. The input file is never modified.

Exit status: 0 when every output is written, 1 on an error, 2 for bad options, 130 on
Ctrl-C and 143 on SIGTERM; each failure is one line on stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ._errors import CLIError, one_line
from ._parser import build_parser
from ._process import Stopped, messages_to_stderr, stop_on_signals

__all__ = ["main", "build_parser", "CLIError"]


def _where(state) -> str:
    if state.model_saved:
        return f"; the trained model is saved in {state.outdir / 'model'}"
    return "; no results were written" if not state.written else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scale-scvi`` console script; returns the exit status."""
    # Transparent huge pages for PyTorch's large CPU allocations (docs/scaling.md);
    # THP_MEM_ALLOC_ENABLE=0 opts out. torch reads it once, so nothing above this line
    # imports torch: the workflow (scale_scvi.SCALE, Lightning) is imported below.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from ._run import Log, Run, run

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    state = Run(Path(args.outdir))
    try:
        with stop_on_signals(), messages_to_stderr(args.debug):
            run(args, state, Log(args.quiet))
    except Stopped as stop:
        print(f"{prog}: {stop}{_where(state)}", file=sys.stderr)
        return stop.exit_code
    except CLIError as err:
        print(f"{prog}: error: {err}{_where(state) if state.written else ''}", file=sys.stderr)
        return 1
    except SystemExit as err:  # e.g. Lightning's exit on an interrupt: never 0 without results
        print(f"{prog}: error: stopped before finishing{_where(state)}", file=sys.stderr)
        return err.code if isinstance(err.code, int) and err.code != 0 else 1
    except Exception as err:
        if args.debug:
            raise
        print(
            f"{prog}: error: {type(err).__name__}: {one_line(err)}{_where(state)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
