"""Process-level behaviour of the CLI: signals and exit codes, warnings, where output goes."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import warnings
from collections.abc import Iterator

_SIGNALS = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "stopped by SIGTERM"}
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "scvi")


class Stopped(BaseException):
    """Raised in the main thread when the process receives SIGINT or SIGTERM.

    A ``BaseException`` (as ``KeyboardInterrupt``), so that no ``except Exception`` on the
    way swallows it; Lightning re-raises it after tearing the trainer down.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        return _SIGNALS.get(self.signum, f"stopped by signal {self.signum}")


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Stopped` for the duration (main thread only)."""
    previous = {}
    try:
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, _raise_stopped)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _from_package(frame) -> bool:
    """Whether the code that called ``warnings.warn`` is this package's."""
    while frame is not None and frame.f_globals.get("__name__") in (__name__, "warnings"):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("scale_scvi")


def _show_package_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _from_package(sys._getframe(1)):
        print(f"scale-scvi: warning: {message}", file=sys.stderr, flush=True)


class _Stderr:
    """``sys.stderr`` without the lines that start with one of ``drop``.

    scvi-tools' training runner prints "Exception raised during training. ..." to stdout on
    every exception, an interrupt included, before re-raising it; the CLI reports the cause
    in its own one line.
    """

    def __init__(self, drop: tuple[str, ...]):
        self.drop = drop
        self._dropping = False

    def write(self, text: str) -> int:
        if text.startswith(self.drop):
            self._dropping = not text.endswith("\n")
            return len(text)
        if self._dropping and text == "\n":
            self._dropping = False
            return len(text)
        self._dropping = False
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def __getattr__(self, name: str):
        return getattr(sys.stderr, name)


@contextlib.contextmanager
def messages_to_stderr(debug: bool) -> Iterator[None]:
    """Everything to stderr (the progress bar too); the package's own warnings only.

    Warnings raised by this package's code are shown, one line each; those of the libraries
    under it (Lightning, torch, scvi-tools, scanpy) are not, unless ``debug``.
    """
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    stdout = sys.stderr if debug else _Stderr(("Exception raised during training.",))
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout):
        warnings.simplefilter("default")
        # torch warns once per process when a sparse CSR tensor is built (the CPU's default
        # sparse minibatches); the warning is raised from torch's C++ code but attributed to
        # the line of this package that called it.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if not debug:
            warnings.showwarning = _show_package_warning
            for name in _QUIET_LOGGERS:
                logging.getLogger(name).setLevel(
                    logging.WARNING if name == "scvi" else logging.ERROR
                )
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
