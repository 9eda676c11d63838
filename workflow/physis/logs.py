"""Logging and progress for long steps: a bar in a terminal, periodic lines in a log file."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Send physis' log lines to stderr and, when given, to ``log_file`` (Snakemake's ``log:``).

    An exception that ends the process is logged too, so a failed job's log file holds its cause,
    not only the console.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind, value, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("physis").critical("failed: %s: %s", kind.__name__, value, exc_info=(kind, value, traceback))


def progress(items: Iterable[T], desc: str, total: int | None = None, every_s: float = 10.0) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal, else a log line every ``every_s`` seconds."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, unit="item")
        return
    log = logging.getLogger("physis.progress")
    start = last = time.monotonic()
    count = 0
    for count, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s done (%.1f/s)", desc, count, of, count / (now - start))
    log.info("%s: %d done in %.1f s", desc, count, time.monotonic() - start)
