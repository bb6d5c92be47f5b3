"""Progress of local steps: a live bar on a terminal, plain lines elsewhere.

Simulation workers (Ray actors) forward output line by line, so a redrawn bar shows only its
first frame there; several clients logging at once also garble bars. Off a terminal we print
about ten short lines per round instead, each naming the client.
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
