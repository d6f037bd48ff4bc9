"""Progress of long loops: a tqdm bar on a terminal; in a log file (stderr not a terminal) one plain line every
`every_s` seconds with done/total, rate, ETA and the loop's own figures (loss, tokens/s), and one at the end.
tqdm alone prints nothing when it is disabled for a non-terminal, so a log of an hour's run showed one line
per epoch; a bar forced on would write thousands of carriage-return updates into the file instead."""
from __future__ import annotations

import sys
import time


def quiet_transformers() -> None:
    """transformers' own weight-loading bars ("Loading weights: 100%...") carry no information for a stage."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 30.0, stream=None,
                 enabled: bool = True):
        self.total, self.desc, self.unit, self.every_s, self.enabled = total, desc, unit, every_s, enabled
        self.stream = stream or sys.stderr
        self.n, self.t0, self.last, self.post = 0, time.perf_counter(), time.perf_counter(), {}
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream)

    def update(self, k: int = 1, **post):
        self.n += k
        self.post.update(post)
        if self.bar is not None:
            self.bar.update(k)
            if post:
                self.bar.set_postfix(**{key: _fmt(v) for key, v in self.post.items()})
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._line()

    def _line(self, final: bool = False):
        dt = time.perf_counter() - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 and not final else 0.0
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.post.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, {dt:.0f} s elapsed"
              f"{'' if final else f', ETA {eta:.0f} s'}) {extra}".rstrip(), file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(final=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
