"""A progress line without dependencies: redrawn in place on a terminal, one line per interval in a log."""
from __future__ import annotations

import sys
import time


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rate(per_second: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= scale:
            return f"{per_second / scale:.1f} {prefix}{unit}/s"
    return f"{per_second:.1f} {unit}/s"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """``desc  [#####.....] 45% 450/1000 unit  12.3 unit/s  eta 0:12  k=v``; the bar and eta need ``total``.

    On a tty the line is redrawn with ``\\r`` at most every ``interval`` seconds (default 0.1); on
    anything else (a log file, a pipe) a full line is written at most every ``interval`` (default 10).
    ``close()`` always writes the final line. A stream that fails (closed, broken pipe) silences it.
    ``initial`` starts the count part way (a resumed run) without counting it in the rate.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "", stream=None,
                 enabled: bool = True, interval: float | None = None, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled, self.closed = enabled, False
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):
            self.tty = False
        self.interval = interval if interval is not None else (0.1 if self.tty else 10.0)
        self.n, self.initial, self.postfix = initial, initial, {}
        self.start = self.last = time.monotonic()
        self.width = 0  # of the last tty line, so a shorter redraw can blank its tail

    def set_postfix(self, **kv):
        self.postfix.update(kv)

    def update(self, n: int = 1, **postfix):
        self.n += n
        self.postfix.update(postfix)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        parts = [self.desc]
        if self.total:
            done = min(self.n / self.total, 1.0)
            filled = int(done * 20)
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {done:4.0%} {self.n}/{self.total}{unit}")
        else:
            parts.append(f"{self.n}{unit}")
        rate = (self.n - self.initial) / elapsed
        parts.append(_rate(rate, self.unit or "it"))
        if self.total and 0 < rate and self.n < self.total:
            parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={_compact(v)}" for k, v in self.postfix.items()))
        return "  ".join(parts)

    def _write(self, final: bool):
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            text, self.width = "\r" + text.ljust(self.width), len(text)
            text += "\n" if final else ""
        else:
            text += "\n"
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):  # closed stream or broken pipe: progress is never worth a crash
            self.enabled = False

    def close(self):
        if not self.closed:
            self.closed = True
            self._write(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
