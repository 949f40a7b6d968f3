"""A stand-in for a launcher and its rank, to test how launch/lib.sh passes SIGTERM on.

``python term_tree.py DIR`` is the "launcher": like DeepSpeed's runner in the
local and --no_ssh modes it has no SIGTERM handler of its own, starts one
"rank" and waits for it. The rank writes DIR/ready, and on SIGTERM takes a
second to "save", writes DIR/saved and exits with 143, as the trainer does.
The launcher writes DIR/launcher_done after the rank is gone and exits with
the rank's status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RANK = r"""
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
asked = []
signal.signal(signal.SIGTERM, lambda *_: asked.append(1))
(out / "ready").write_text("")
deadline = time.time() + 60
while not asked and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # the checkpoint
(out / "saved").write_text("")
sys.exit(143)
"""


def main() -> int:
    out = Path(sys.argv[1])
    rank = subprocess.Popen([sys.executable, "-c", RANK, str(out)])
    rc = rank.wait()
    (out / "launcher_done").write_text(str(rc))
    return rc


if __name__ == "__main__":
    sys.exit(main())
