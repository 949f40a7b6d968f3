"""SIGKILL a training run at random moments until it has been killed N times, then let it finish.

    python scripts/kill_loop.py [--kills 30] [--seed 0] [--workdir DIR]

A tiny in-process LLaMA trains 12 steps with a checkpoint after every step
(save_steps: 1); each restart resumes from the newest complete checkpoint.
After every kill the output folder is checked: a run that says it finished
(summary.json) must have its adapter. At the end the adapter must be bitwise
equal to that of the same run made without interruption. Exit status 0 when
both hold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from train_fixtures import adapter_tensors, base_values, make_base, make_rows, write_config, write_rows

    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "REFLORA_DS_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    base, data = make_base(work / "base"), write_rows(work / "train.json", make_rows(60))

    def config(name: str) -> Path:
        return write_config(work / f"{name}.yaml", **base_values(base, data, work / name, max_steps=12, save_steps=1,
                                                                 eval_steps=4, save_total_limit=2))

    def run(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "reflora_ds", "train", str(config(name))], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    started = time.perf_counter()
    if run("reference").wait() != 0:
        print("the uninterrupted run failed", file=sys.stderr)
        return 1
    span = time.perf_counter() - started  # how long one whole run takes here
    print(f"reference run: {span:.1f} s")

    import torch

    reference = adapter_tensors(work / "reference")

    def same_adapter() -> bool:
        final = adapter_tensors(out)
        return final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)

    from reflora_ds.checkpoint import list_complete

    rng = random.Random(args.seed)
    out, kills, violations, finishes, mid_training = work / "killed", 0, [], [], 0
    while kills < args.kills:
        newest = lambda: max((step for step, _ in list_complete(out)), default=0)  # noqa: E731
        before = newest()
        proc = run("killed")
        try:
            proc.wait(timeout=rng.uniform(0.2, span))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            mid_training += len(list_complete(out)) != before  # it had saved a step before it died
        summary = out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "finished" \
                and not (out / "adapter" / "adapter_model.safetensors").is_file():
            violations.append(f"after kill {kills}: summary.json says finished, no adapter")
        if proc.returncode == 0:  # it got to the end between two kills: check it, then start over
            finishes.append(same_adapter())
            print(f"the run finished before kill {kills + 1} (adapter equal: {finishes[-1]}); starting over")
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"{kills} kills, {mid_training} of them after the run had saved a new step")
    if run("killed").wait() != 0:
        print("the resumed run failed", file=sys.stderr)
        return 1
    finishes.append(same_adapter())
    print(f"runs finished: {len(finishes)}, adapters bitwise equal to the uninterrupted run: {sum(finishes)}; "
          f"finished-without-adapter states seen: {len(violations)}")
    for line in violations:
        print(line)
    return 0 if all(finishes) and not violations else 1


if __name__ == "__main__":
    sys.exit(main())
