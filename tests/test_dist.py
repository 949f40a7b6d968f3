"""The process group's lifetime: a gloo group is destroyed before the interpreter tears itself down.

Left alive into interpreter finalization, gloo's worker threads can abort a
process whose run succeeded (SIGABRT, "terminate called without an active
exception"). The check runs in a child process: a handler registered before
the trainer's world starts runs after ours (atexit is last in, first out) and
reports whether the group is still there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from train_fixtures import subprocess_env

CHILD = textwrap.dedent("""
    import atexit
    import torch.distributed as tdist
    atexit.register(lambda: print("group alive at exit:", tdist.is_initialized(), flush=True))

    from reflora_ds import dist
    rank, world = dist.start_deepspeed()
    print("started:", rank, world, tdist.get_backend(), flush=True)
""")


def test_gloo_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD], env=subprocess_env(tmp_path / "cache"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started: 0 1 gloo" in proc.stdout, proc.stdout
    assert "group alive at exit: False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
