"""Progress of local steps: a live bar on a terminal, plain lines elsewhere.

Simulation workers (Ray actors) forward output line by line, so a redrawn bar shows only its
first frame there; several clients logging at once also garble bars. Off a terminal we print
about ten short lines per round instead, each naming the client.

Other long steps (a client's evaluation, the server's rounds) print plain lines: `Ticker` at
most one every ten seconds, `run_eta` after each round with the time left.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class StepProgress:
    """Call `update(loss)` after each optimizer step; `close()` at the end."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.start = time.perf_counter()
        self.every = max(1, total // 10)
        self.bar = (tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                         dynamic_ncols=True) if sys.stderr.isatty() else None)

    def update(self, loss: float) -> None:
        """Record one finished step with its loss."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            rate = (time.perf_counter() - self.start) / self.done
            print(f"{self.desc}: step {self.done}/{self.total} loss {loss:.4f} "
                  f"({rate:.2f} s/step)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Ticker:
    """Progress of a long step without a bar: `update(done)` says '<desc>: <done>/<total>
    <unit>, <seconds> s' at most once every `every` seconds (the first after `every` seconds,
    so a short step says nothing), by `say` (default: a line on stderr); `clock` is
    injectable for tests."""

    def __init__(self, desc: str, total: int, unit: str, every: float = 10.0,
                 clock=time.monotonic, say=None) -> None:
        self.desc, self.total, self.unit, self.every, self.clock = desc, total, unit, every, clock
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start = self.last = clock()

    def update(self, done: int) -> str | None:
        """Say how far the step is when `every` seconds passed since the last line; the
        line printed, or None."""
        now = self.clock()
        if now - self.last < self.every:
            return None
        self.last = now
        line = f"{self.desc}: {done}/{self.total} {self.unit}, {now - self.start:.0f} s"
        self.say(line)
        return line


def run_eta(server_round: int, num_rounds: int, elapsed: float, durations: list[float]
            ) -> str:
    """After `server_round` of `num_rounds`: its time, the run's `elapsed` seconds and the
    time left, estimated as the rounds left times the mean of `durations` (the rounds this
    process ran, oldest first) without the first, which also loads the models: no estimate
    until a second round has run."""
    done = f"round {server_round}/{num_rounds} done in {durations[-1]:.1f} s; " \
           f"{clock(elapsed)} elapsed"
    left = num_rounds - server_round
    if left <= 0:
        return f"{done}; that was the last round"
    if len(durations) < 2:
        return f"{done}; {left} round(s) left (an estimate after the next round)"
    mean = sum(durations[1:]) / len(durations[1:])
    return f"{done}; {left} round(s) left, about {clock(left * mean)} (mean {mean:.1f} s/round)"


def clock(seconds: float) -> str:
    """Seconds as '42 s', '3 min 05 s' or '2 h 03 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
