"""Progress bars that suit where the output goes: tqdm's bar on a terminal; in a log file (SLURM, nohup, CI) a
plain log line with tqdm's status (done/total, rate, time left) at most every ``log_seconds`` and only when the count
moved, instead of a bar made of carriage returns nobody reads."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class _LogLines:
    """A file-like target for tqdm that logs each status it writes as one INFO line."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            log.info(text)

    def flush(self) -> None:
        pass


class _LogBar(tqdm):
    """tqdm for log lines: a status is shown only when the count moved since the last one shown (tqdm's monitor and
    its time-based refreshes would otherwise repeat ``15/56`` line after line while one slow batch runs)."""

    _shown_n: float | None = None

    def display(self, msg: str | None = None, pos: int | None = None, **kwargs: Any) -> bool:
        if msg is None:  # a status line (an explicit ``msg`` clears or overrides, and always passes)
            if self.n == self._shown_n:
                return True
            self._shown_n = self.n
        return super().display(msg, pos, **kwargs)


def progress(iterable: Any = None, *, desc: str, unit: str = "it", total: int | None = None, enabled: bool = True,
             log_seconds: float = 30.0) -> tqdm:
    """``tqdm(iterable, ...)`` on a terminal; log lines every ``log_seconds`` elsewhere; nothing when not
    ``enabled``."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit)
    return _LogBar(iterable, total=total, desc=desc, unit=unit, file=_LogLines(), mininterval=log_seconds, ascii=True,
                   ncols=100)
