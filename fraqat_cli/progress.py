"""One labelled progress line per stage (encoding prompts, teacher latents, training, generating, features).

On a terminal it is a tqdm bar with the stage's label. Redirected (a SLURM log, a pipe) a bar would be one
endless line of carriage returns, so it writes whole lines instead, a few per stage: when the stage has run
`HOLD_START_S` (a stage done sooner is its end line alone: a log of many short stages stays short), at each
quarter of its work (unless the last line is under `MIN_GAP_S` old), every `LOG_EVERY_S` seconds in between for
a long stage, and at its end.
Every line starts with the label, so `grep 'teacher latents' slurm.log` finds a stage.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tqdm import tqdm

LOG_EVERY_S = 300.0  # redirected: a long stage still says something every five minutes
MILESTONES = 4  # redirected: a line at each quarter of the work...
MIN_GAP_S = 30.0  # ...that comes at least this long after the last one: a short stage is its start and end
HOLD_START_S = 30.0  # redirected: a stage still running after this long writes its start line (shorter: its end alone)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress of one stage of `total` units (rows, images, steps), on stderr, rank 0 only.

    `update(n, **postfix)` advances it; postfix values (loss, bits) are shown beside the count.
    `enabled=False` shows nothing (a DDP worker, `trainer.enable_progress_bar=false`)."""

    def __init__(self, label: str, total: int, unit: str = "it", initial: int = 0, enabled: bool = True,
                 stream=None, min_gap_s: float = MIN_GAP_S, hold_start_s: float = HOLD_START_S) -> None:
        self.label, self.total, self.unit, self.done, self.initial = label, total, unit, initial, initial
        self.stream, self.min_gap_s = stream or sys.stderr, min_gap_s
        self.enabled = enabled and int(os.environ.get("LOCAL_RANK", "0")) == 0
        self.started = self._last_line = time.monotonic()
        self._next_milestone = 1
        self._postfix: dict = {}
        self._bar = None
        self._lock, self._start_timer, self._start_written = threading.Lock(), None, False
        if not self.enabled:
            return
        self._skip_milestones()  # a resumed stage: the quarters already done are not announced
        if getattr(self.stream, "isatty", lambda: False)():
            self._bar = tqdm(total=total, initial=initial, desc=label, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=True)
        elif hold_start_s > 0:
            self._start_timer = threading.Timer(hold_start_s, self._write_start)
            self._start_timer.daemon = True
            self._start_timer.start()
        else:
            self._write_start()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self._postfix.update({k: v for k, v in postfix.items() if v is not None})
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self._postfix_text(), refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        milestone = self.done * MILESTONES >= self._next_milestone * self.total
        since = now - self._last_line
        if self.done < self.total and ((milestone and since >= self.min_gap_s) or since >= LOG_EVERY_S):
            self._write_start()  # the start line first, whether or not its hold is over
            self._skip_milestones()
            self._line(self._status(now))

    def close(self, stopped: bool = False) -> None:
        """The stage's last line: its count and how long it took (`stopped`: by an error, where it got to)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            return
        if self._start_timer is not None:
            self._start_timer.cancel()
        with self._lock:  # a hold's timer firing now writes nothing after the end line
            held_back, self._start_written = not self._start_written, True
        resumed = f", resumed at {self.initial}" if self.initial and held_back else ""
        extra = f", {self._postfix_text()}" if self._postfix else ""
        self._line(("stopped at " if stopped else "") + f"{self.done}/{self.total} {self.unit} in "
                   f"{_duration(time.monotonic() - self.started)}{resumed}{extra}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, error_type, *exc) -> None:
        self.close(stopped=error_type is not None)

    def _write_start(self) -> None:
        """The stage's first line (once; from the hold's timer thread or the first milestone line)."""
        with self._lock:
            if self._start_written:
                return
            self._start_written = True
            self._line(f"{self.initial}/{self.total} {self.unit}" + (" (resumed)" if self.initial else ""))

    def _skip_milestones(self) -> None:
        while self.total and self._next_milestone * self.total <= self.done * MILESTONES:
            self._next_milestone += 1

    def _status(self, now: float) -> str:
        elapsed = now - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ""
        extra = f", {self._postfix_text()}" if self._postfix else ""
        return f"{self.done}/{self.total} {self.unit} ({100 * self.done // max(self.total, 1)}%), " \
               f"{_duration(elapsed)} elapsed{eta}{extra}"

    def _postfix_text(self) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self._postfix.items())

    def _line(self, text: str) -> None:
        self._last_line = time.monotonic()
        print(f"[{self.label}] {text}", file=self.stream, flush=True)
