"""What `nlsr run` prints when a stage fails: one clear line on the console, the whole story in a log file.

Prefect logs every failure with its traceback (80-100 lines for one bad path). During a run the console
handlers show log records without their tracebacks, a file handler under `<artifact_root>/logs/` keeps
everything, and the command ends with one line naming the stage, the error and the log file. `--debug` leaves
the console untouched and re-raises.
"""
from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from pathlib import Path

from nlsr.errors import NLSRError
from tasks.stages import STAGE_NOTE


class _NoTraceback(logging.Formatter):
    """Formats a record with the wrapped formatter, minus its traceback (the log file has it)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        bare = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(bare)


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if n.startswith("prefect")]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextmanager
def run_log(log_file: Path, debug: bool = False):
    """Log everything (tracebacks included) to `log_file`; unless `debug`, keep tracebacks off the console."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(file_handler)
    swapped = []
    if not debug:
        for h in _console_handlers():
            swapped.append((h, h.formatter))
            h.setFormatter(_NoTraceback(h.formatter))
    try:
        yield file_handler
    finally:
        for h, fmt in swapped:
            h.setFormatter(fmt)
        root.removeHandler(file_handler)
        file_handler.close()


def stage_of(err: BaseException) -> str | None:
    for note in getattr(err, "__notes__", None) or []:
        if note.startswith(STAGE_NOTE):
            return note[len(STAGE_NOTE):]
    return None


def one_line(err: BaseException) -> str:
    """'stage finetune 1a2b: ModelError: ...': the stage (if known) and the error's first line; user errors
    (NLSRError) keep their whole message, which is written to be read."""
    text = str(err).strip()
    if not isinstance(err, NLSRError):
        text = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    stage = stage_of(err)
    return f"stage {stage} failed: {text}" if stage else text


def write_traceback(err: BaseException, log_file: Path) -> None:
    with open(log_file, "a") as fh:
        traceback.print_exception(err, file=fh)
