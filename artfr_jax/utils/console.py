"""What a user of the commands sees: progress, eval results and where outputs went on the console;
the full log (absl, orbax, clu) in a file of the workdir.

Code that talks to the user calls :func:`say` (process 0 only; a plain line, no log prefix). The
main command calls :func:`route_logs` at start-up and :func:`log_to_file` once it knows its process:
every log record then goes to ``WORKDIR/train.log`` (``train.<process>.log`` on other processes),
and the console keeps only :func:`say` lines and warnings unless ``--verbosity=1`` (or higher) asks
for everything; :func:`for_notebook` does both for ``main.run`` called from a notebook. Without
:func:`route_logs` (tests) nothing is filtered.
"""

from __future__ import annotations

import importlib
import logging
import logging.handlers
import os
import sys
import tempfile

from absl import logging as absl_logging
from tqdm import tqdm

LOGGER = logging.getLogger("artfr_jax.console")


def say(message: str, *args) -> None:
    """One line for the user (``%``-style ``args``), in the log file too."""
    LOGGER.info(message, *args, stacklevel=2)


class _ConsoleHandler(logging.Handler):
    """Writes :func:`say` lines to stderr through ``tqdm.write``, so that a progress bar on the
    terminal is redrawn below them instead of being torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging must not raise
            self.handleError(record)


def _is_console_record(record: logging.LogRecord) -> bool:
    return record.name == LOGGER.name


def import_quietly(module: str) -> None:
    """Imports ``module`` (TensorFlow, through clu and TFDS) with the process's stderr captured,
    and logs what it wrote. TensorFlow 2.21 prints INFO lines from C++ on import on CPUs with
    AVX-512 BF16 (its oneDNN and CPU-feature notes) before ``TF_CPP_MIN_LOG_LEVEL`` applies, so
    they would reach the console past :func:`route_logs`. A failed import writes what it printed
    back to stderr and raises as usual; a missing module is left to the code that needs it."""
    if module in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (some notebook kernels): import as is
        _import_if_present(module)
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            _import_if_present(module)
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace").strip()
    if text:
        logging.getLogger("artfr_jax.imports").info("import %s printed:\n%s", module, text)


def _import_if_present(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise


def route_logs(verbosity: int) -> None:
    """For ``verbosity < 1``: only :func:`say` lines and warnings on the console. Every record is
    kept (in memory) until :func:`log_to_file` names the file. Call it first, before JAX starts a
    backend, so that its start-up lines are routed too. Idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_artfr_jax", False):
            root.removeHandler(h)
    # absl's handler hands each record to its Python handler, whose filters are the ones applied.
    absl_handler = absl_logging.get_absl_handler().python_handler
    for f in list(absl_handler.filters):
        if getattr(f, "_artfr_jax", False):
            absl_handler.removeFilter(f)
    buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
    buffer._artfr_jax = True
    root.addHandler(buffer)
    if verbosity < 1:
        absl_handler.addFilter(_QuietFilter())
        console = _ConsoleHandler(logging.INFO)
        console.addFilter(_is_console_record)
        console.setFormatter(logging.Formatter("%(message)s"))
        console._artfr_jax = True
        root.addHandler(console)


def log_to_file(workdir: str, process_index: int = 0) -> str:
    """Writes every log record, those kept since :func:`route_logs` first, to
    ``WORKDIR/train.log`` (``train.<process>.log`` on other processes); returns its path. A
    ``gs://`` (or other URI) workdir cannot be appended to: the log then goes to the local
    temporary folder, named after the workdir."""
    name = "train.log" if process_index == 0 else f"train.{process_index}.log"
    if "://" in workdir:
        local = "".join(c if c.isalnum() or c in "-_." else "_" for c in workdir)
        workdir = os.path.join(tempfile.gettempdir(), "artfr_jax_logs", local)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(absl_logging.PythonFormatter())
    file_handler._artfr_jax = True
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.handlers.MemoryHandler) and getattr(h, "_artfr_jax", False):
            h.setTarget(file_handler)
            h.flush()
            root.removeHandler(h)
        elif isinstance(h, logging.FileHandler) and getattr(h, "_artfr_jax", False):
            root.removeHandler(h)
            h.close()
    root.addHandler(file_handler)
    return path


def for_notebook(workdir: str | None = None) -> str | None:
    """The commands' console in a notebook (or any script calling ``main.run``): progress lines,
    results and warnings in the cell's output, every log record kept for ``WORKDIR/train.log``
    (written once :func:`log_to_file` names the workdir; returns its path when ``workdir`` is
    given). Call it before anything logs, so that absl's handler is the one installed."""
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # no command line: absl's defaults
    absl_logging.use_absl_handler()
    logging.getLogger().setLevel(logging.INFO)
    route_logs(0)
    return log_to_file(workdir) if workdir else None


class _QuietFilter(logging.Filter):
    """Keeps warnings and errors on absl's console handler; :func:`say` lines go through
    :class:`_ConsoleHandler` instead."""

    _artfr_jax = True

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not _is_console_record(record)
