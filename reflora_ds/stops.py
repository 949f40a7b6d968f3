"""How a run stops early, and what it says: SIGTERM (preemption) and a loss that is no longer finite.

Preemption: SIGTERM sets a flag; at the next optimizer-step boundary every
rank agrees to stop, a checkpoint is saved and the command exits with status
143 (128 + SIGTERM, so requeue wrappers see a stopped, resumable run).

Divergence: a non-finite loss on any rank (checked on every micro-batch,
before its gradient is taken) or a non-finite gradient norm stops the run
with status 3 and saves nothing, naming the last good checkpoint.
``skip_nonfinite_steps`` lets a run leave up to that many steps' non-finite
micro-batches out instead.
"""

from __future__ import annotations

import signal
from pathlib import Path

# Exit status of a run stopped by SIGTERM after saving: 128 + SIGTERM, the
# shell's convention for "terminated", so requeue wrappers see it was stopped.
PREEMPTED_EXIT_CODE = 143
DIVERGED_EXIT_CODE = 3


class Diverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was saved after the last good checkpoint."""

    def __init__(self, step: int, what: str, output_dir: Path):
        from .checkpoint import find_latest_complete

        last = find_latest_complete(output_dir)
        super().__init__(
            f"step {step}: {what}; the run stops without saving. The last good checkpoint is "
            + (f"{last}: resume from it (resume_from_checkpoint) with a lower learning_rate" if last else
               "none: start again with a lower learning_rate")
            + ", or set skip_nonfinite_steps to leave such micro-batches out")


class PreemptionGuard:
    """Turns SIGTERM (a Slurm preemption, a launcher's shutdown) into a flag.

    The loop checks ``requested`` at each optimizer-step boundary, where all
    ranks agree (via the step's all-reduce) to save and stop together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
