"""Logging of `tta run` / `tta bench`: the ``tta`` logger to the console and into the run folder.

Console lines go through `tqdm.write` when tqdm is installed (so progress bars stay intact), else to
stdout; with an output folder every line is also written to ``<out>/run.log`` with a timestamp.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER_NAME = "tta"
LOG_FILE = "run.log"


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            try:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stdout)
            except ImportError:
                print(message, file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


@contextmanager
def run_logging(out_dir: Path | None) -> Iterator[logging.Logger]:
    """The ``tta`` logger at INFO with a console handler (+ ``out_dir/run.log``) for the block."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers: list[logging.Handler] = [_ConsoleHandler()]
    if out_dir is not None:
        file_handler = logging.FileHandler(out_dir / LOG_FILE, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the console handler prints; the root logger would print twice
    for h in handlers:
        logger.addHandler(h)
    try:
        yield logger
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate
