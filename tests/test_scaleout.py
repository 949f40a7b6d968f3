"""Scale-out proofs on this one machine: the launch scripts, two nodes, a real Slurm.

- The launch scripts build the documented DeepSpeed / torchrun command lines,
  and pass SIGTERM on so that ranks can checkpoint before they exit.
- Two nodes as two Linux network namespaces joined by a veth pair, one rank in
  each, rendezvous over the veth addresses: a ZeRO-2 RefLoRA run through
  launch/multi_node.sh (--no_ssh --node_rank) equals a single-process run with
  the same global batch (2 nodes × micro-batch 2 vs 1 process × micro-batch 2
  × accumulation 2).
- A real Slurm (Debian's slurm-wlm with munge, two slurmd on this host,
  started by scripts/slurm_local.sh): slurm/train.sbatch ends COMPLETED with a
  checkpoint; a job sent SIGTERM checkpoints, requeues itself and resumes.

They need root (namespaces, Slurm daemons) and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_fixtures import (
    adapter_tensors,
    base_values,
    make_base,
    make_rows,
    metrics,
    subprocess_env,
    write_config,
    write_rows,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SLURM = ROOT / "slurm"
SCRIPTS = ROOT / "scripts"
RUN_TIMEOUT = 300  # seconds for one training run (2 cores, shared)

pytestmark = pytest.mark.distributed


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and Slurm daemons")


def run(cmd, *, env=None, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, timeout=timeout, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({path}: {err})"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA, 40 rows, a tokenization cache, and the environment for child processes."""
    root = tmp_path_factory.mktemp("scaleout")
    base = make_base(root / "base")
    data = write_rows(root / "train.json", make_rows(40))
    env = subprocess_env(root / "cache")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for var in ("HOSTFILE", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "LAUNCH_MODE", "LAUNCH_DRY_RUN",
                "LAUNCHER_ARGS", "GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return {"root": root, "base": base, "data": data, "env": env}


def zero2_config(tiny, name: str, **overrides) -> Path:
    """A ZeRO-2 RefLoRA run without dropout (so that ranks draw no random numbers)."""
    values = base_values(tiny["base"], tiny["data"], tiny["root"] / name, deepspeed="zero2", lora_dropout=0.0,
                         eval_steps=0, save_steps=0)
    values.update(overrides)
    return write_config(tiny["root"] / f"{name}.yaml", **values)


# --- the launch scripts -----------------------------------------------------------------


def dry_run(script: str, args: list[str], env: dict, **extra) -> str:
    proc = run([LAUNCH / script, *args], env={**env, "LAUNCH_DRY_RUN": "1", **extra}, cwd="/")
    return proc.stdout.strip()


def test_launch_scripts_build_the_documented_commands(tiny):
    env = tiny["env"]
    py = re.escape(sys.executable)

    one = dry_run("single_node.sh", ["train", "run.yaml", "--max-steps", "3"], env, NPROC_PER_NODE="4")
    assert re.fullmatch(py + r" -m deepspeed\.launcher\.runner --num_gpus 4 --master_port 29500 "
                        r"--module reflora_ds train run\.yaml --max-steps 3", one), one

    visible = dry_run("single_node.sh", ["train", "run.yaml"], env, CUDA_VISIBLE_DEVICES="2,3,5", NPROC_PER_NODE="2")
    assert " --include localhost:2,3 --master_port 29500 " in visible and "--num_gpus" not in visible, visible

    node = dry_run("multi_node.sh", ["--no-ssh", "train", "run.yaml"], env, NNODES="2", NODE_RANK="1",
                   MASTER_ADDR="10.1.2.3", MASTER_PORT="29999")
    assert re.fullmatch(py + r" -m deepspeed\.launcher\.runner --hostfile \S+ --master_addr 10\.1\.2\.3 "
                        r"--master_port 29999 --no_ssh --node_rank 1 --module reflora_ds train run\.yaml", node), node

    ssh = dry_run("multi_node.sh", ["train", "run.yaml"], env, HOSTFILE=str(LAUNCH / "hostfile.example"),
                  MASTER_ADDR="10.1.2.3")
    assert f"--hostfile {LAUNCH / 'hostfile.example'} " in ssh and "--launcher pdsh" in ssh, ssh
    assert "--no_ssh" not in ssh

    torchrun = dry_run("torchrun.sh", ["train", "run.yaml"], env, NNODES="2", NODE_RANK="1",
                       MASTER_ADDR="10.1.2.3", NPROC_PER_NODE="2")
    assert re.fullmatch(py + r" -m torch\.distributed\.run --nnodes 2 --node_rank 1 --nproc_per_node 2 "
                        r"--master_addr 10\.1\.2\.3 --master_port 29500 -m reflora_ds train run\.yaml",
                        torchrun), torchrun

    # Mistakes are refused before anything starts.
    for script, args, extra in [
        ("multi_node.sh", ["--no-ssh", "train", "x.yaml"], {"NNODES": "2", "NODE_RANK": "2"}),
        ("multi_node.sh", ["--no-ssh", "train", "x.yaml"], {"NNODES": "2"}),
        ("multi_node.sh", ["train", "x.yaml"], {"HOSTFILE": str(LAUNCH / "hostfile.example")}),
        ("torchrun.sh", ["train", "x.yaml"], {"NNODES": "2", "NODE_RANK": "0"}),
        ("single_node.sh", [], {}),
    ]:
        proc = run([LAUNCH / script, *args], env={**env, "LAUNCH_DRY_RUN": "1", **extra}, check=False)
        assert proc.returncode == 2 and proc.stderr.strip(), (script, args, extra, proc.stdout, proc.stderr)


def test_batch_scripts_have_no_shell_variables_in_sbatch_lines():
    scripts = sorted(SLURM.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"train.sbatch", "eval.sbatch", "sweep.sbatch"}
    for path in scripts:
        lines = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
        assert lines, path
        assert not [line for line in lines if "$" in line or "`" in line], path
        run(["bash", "-n", path])


def test_sigterm_reaches_the_ranks_and_the_launcher_waits_for_their_checkpoint(tmp_path, tiny):
    """run_launcher: the launcher survives SIGTERM, the rank gets it, saves, and 143 comes back."""
    script = f'source {LAUNCH / "lib.sh"}; run_launcher {sys.executable} {ROOT / "tests/scaleout/term_tree.py"} {tmp_path}'
    proc = subprocess.Popen(["bash", "-c", script], env=tiny["env"], start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.time() < deadline, "the stand-in rank never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "saved").exists(), "the rank was not given SIGTERM or was killed before saving"
    assert (tmp_path / "launcher_done").read_text() == "143", "the launcher died before its rank"
    assert rc == 143


# --- two nodes: two network namespaces ------------------------------------------------


@pytest.fixture
def two_namespaces(tiny):
    """Two network namespaces joined by a veth pair; removed (with anything left inside) afterwards."""
    need_root()
    if shutil.which("ip") is None:
        run(["bash", SCRIPTS / "install_slurm.sh"], timeout=600, check=False)
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed and could not be installed")
    name = f"rf{os.getpid() % 100000}"
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    proc = run(["bash", SCRIPTS / "netns.sh", "up", name, subnet], check=False)
    if proc.returncode != 0:
        run(["bash", SCRIPTS / "netns.sh", "down", name], check=False)
        if "Operation not permitted" in proc.stderr or "Permission denied" in proc.stderr:
            pytest.skip(f"the kernel forbids network namespaces here: {proc.stderr.strip()}")
        raise AssertionError(f"netns.sh up failed:\n{proc.stdout}\n{proc.stderr}")
    try:
        yield {"ns": [f"{name}-0", f"{name}-1"], "dev": [f"{name}-v0", f"{name}-v1"],
               "addr": [f"{subnet}.1", f"{subnet}.2"]}
    finally:
        run(["bash", SCRIPTS / "netns.sh", "down", name], check=False)
        left = run(["ip", "netns", "list"], check=False).stdout
        assert name not in left, f"namespaces left behind: {left}"


def veth_bytes(ns: str, dev: str) -> int:
    stats = json.loads(run(["ip", "-n", ns, "-j", "-s", "link", "show", dev]).stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def max_deviation(ref: dict, other: dict) -> float:
    """The largest |ref - other| of any tensor, relative to that tensor's largest |ref| entry."""
    return max(float((ref[k] - other[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)


def checkpoint_deviation(ref_out: Path, other_out: Path) -> str:
    """The same measure on the fp32 masters of the final DeepSpeed checkpoints (to tell a save bug from a training one)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        ref, other = (get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step-6",
                                                               exclude_frozen_parameters=True)
                      for out in (ref_out, other_out))
        return f"{max_deviation(ref, other):.2e}"
    except Exception as err:  # a diagnosis only
        return f"(not readable: {err})"


def test_two_namespace_nodes_match_the_single_process_reference(tiny, two_namespaces):
    net = two_namespaces
    env = tiny["env"]
    config = zero2_config(tiny, "netns")
    ref_out, multi_out = tiny["root"] / "netns-reference", tiny["root"] / "netns-two-nodes"
    hostfile = tiny["root"] / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")

    # The reference, one process with micro-batch 2 × accumulation 2, runs beside
    # the two nodes, one rank each with micro-batch 2 and no accumulation: the same
    # global batch of 4.
    before = veth_bytes(net["ns"][0], net["dev"][0])
    commands, envs, logs = [], [], []
    commands.append([sys.executable, "-m", "reflora_ds", "train", str(config), "--output-dir", str(ref_out),
                     "--micro-batch-size", "2", "--gradient-accumulation-steps", "2"])
    envs.append(env)
    for rank in (0, 1):
        commands.append(["ip", "netns", "exec", net["ns"][rank], str(LAUNCH / "multi_node.sh"), "--no-ssh",
                         "train", str(config), "--output-dir", str(multi_out), "--micro-batch-size", "2",
                         "--gradient-accumulation-steps", "1"])
        envs.append({**env, "NODE_RANK": str(rank), "HOSTFILE": str(hostfile), "NPROC_PER_NODE": "1",
                     "MASTER_ADDR": net["addr"][0], "MASTER_PORT": "29500", "GLOO_SOCKET_IFNAME": net["dev"][rank]})
    procs = []
    started = time.time()
    for i, (cmd, cmd_env) in enumerate(zip(commands, envs)):
        logs.append(tiny["root"] / ("netns-reference.log" if i == 0 else f"netns-node{i - 1}.log"))
        with open(logs[-1], "w") as fh:
            procs.append(subprocess.Popen(cmd, env=cmd_env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=RUN_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    seconds = time.time() - started
    assert codes == [0, 0, 0], "\n\n".join(f"{log.name}: exit {c}:\n{tail(log)}" for c, log in zip(codes, logs))
    moved = veth_bytes(net["ns"][0], net["dev"][0]) - before
    assert moved > 20_000, f"only {moved} bytes crossed the veth pair: the ranks did not talk over it"
    assert f"--master_addr={net['addr'][0]}" in logs[2].read_text()

    state = lambda out: json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())  # noqa: E731
    assert state(ref_out)["world_size"] == 1 and state(multi_out)["world_size"] == 2
    assert state(ref_out)["global_batch_size"] == state(multi_out)["global_batch_size"] == 4

    ref_m, multi_m = metrics(ref_out), metrics(multi_out)
    ref_loss = [r["loss"] for r in ref_m if "loss" in r]
    multi_loss = [r["loss"] for r in multi_m if "loss" in r]
    assert len(ref_loss) == len(multi_loss) == 6
    assert multi_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), (multi_loss, ref_loss)
    ref_eval, multi_eval = ref_m[-1]["eval_loss"], multi_m[-1]["eval_loss"]
    assert multi_eval == pytest.approx(ref_eval, rel=1e-5)
    assert multi_eval < ref_m[0]["eval_loss"], "the run did not train"

    ref_adapter, multi_adapter = adapter_tensors(ref_out), adapter_tensors(multi_out)
    assert ref_adapter.keys() == multi_adapter.keys() and ref_adapter
    assert any(float(t.abs().max()) > 0 for k, t in ref_adapter.items() if "lora_B" in k), "B never moved"
    # Adam turns rounding noise in near-zero gradient entries into O(lr) steps, so
    # after a few steps entries may differ by ~1e-4 of the tensor's scale; a wrong
    # batch, scale or gather differs by O(1).
    worst = max_deviation(ref_adapter, multi_adapter)
    assert worst < 1e-3, (f"the saved adapters differ: worst deviation {worst:.2e} of a tensor's largest entry; "
                          f"the fp32 masters in the two checkpoints differ by {checkpoint_deviation(ref_out, multi_out)}")
    print(f"\ntwo namespaces ({net['addr'][0]} <-> {net['addr'][1]}, {moved} bytes over the veth): "
          f"final loss {multi_loss[-1]:.7f} eval {multi_eval:.7f}; "
          f"single process: final loss {ref_loss[-1]:.7f} eval {ref_eval:.7f}; both in {seconds:.0f} s; "
          f"adapter max relative deviation {worst:.1e}")


# --- a real Slurm -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tiny):
    """A two-node Slurm cluster on this host (scripts/slurm_local.sh), stopped afterwards."""
    need_root()
    tools = ("slurmctld", "slurmd", "sbatch", "munged")
    if not all(shutil.which(t) for t in tools):
        run(["bash", SCRIPTS / "install_slurm.sh"], timeout=600, check=False)
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"Slurm cannot be installed here (missing {', '.join(missing)}; "
                    "scripts/install_slurm.sh needs root and apt-get)")
    # Under the pytest temporary folder (short enough for munge's socket path).
    cluster = Path(tiny["root"]) / "slurm"
    started = run(["bash", SCRIPTS / "slurm_local.sh", "start", cluster, "2"], timeout=120, check=False)
    env = {**tiny["env"], "SLURM_CONF": str(cluster / "slurm.conf")}
    daemons = {p.name: int(p.read_text().split()[0]) for p in cluster.glob("**/*.pid") if p.read_text().strip()}
    try:
        assert started.returncode == 0, (f"slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}\n"
                                         + "\n".join(tail(p, 20) for p in sorted((cluster / "log").glob("*.log"))))
        assert len(daemons) == 4, daemons  # munged, slurmctld, two slurmd
        yield {"env": env, "dir": cluster}
    finally:
        run(["bash", SCRIPTS / "slurm_local.sh", "stop", cluster], timeout=120, check=False)
        alive = {name: pid for name, pid in daemons.items() if _alive(pid)}
        assert not alive, f"daemons still running after slurm_local.sh stop: {alive}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited


def sbatch(slurm, *args) -> str:
    return run(["sbatch", "--parsable", *args], env=slurm["env"], cwd=ROOT).stdout.strip().split(";")[0]


def job_info(slurm, job: str) -> dict[str, str]:
    text = run(["scontrol", "show", "job", job], env=slurm["env"], check=False).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_job(slurm, job: str, states: tuple[str, ...], timeout: float, log: Path | None = None) -> dict:
    deadline = time.time() + timeout
    while True:
        info = job_info(slurm, job)
        if info.get("JobState") in states:
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "COMPLETED"):
            break
        if time.time() > deadline:
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job} is {info.get('JobState')} (wanted {states}):\n"
                         + (tail(log) if log else "") + "\n" + tail(slurm["dir"] / "log" / "slurmctld.log", 20))


def state_line(slurm, job: str) -> str:
    text = run(["scontrol", "show", "job", job], env=slurm["env"]).stdout
    return " ".join(line.strip() for line in text.splitlines() if "JobState=" in line or "Restarts=" in line)


def test_slurm_train_job_checkpoints_on_sigterm_requeues_resumes_and_completes(tiny, slurm):
    """sbatch slurm/train.sbatch on two nodes; SIGTERM mid-run; the requeued job resumes and ends COMPLETED."""
    steps = 100
    config = zero2_config(tiny, "slurm-train", max_steps=steps)
    out, log = tiny["root"] / "slurm-train", tiny["root"] / "slurm-train.out"
    job = sbatch(slurm, f"--output={log}", SLURM / "train.sbatch", config, "--output-dir", out,
                 "--gradient-accumulation-steps", "1")

    # Once it trains, SIGTERM to the batch shell, as #SBATCH --signal=B:TERM@120 sends before the time limit.
    deadline = time.time() + RUN_TIMEOUT
    while not any(r.get("step", 0) >= 3 for r in _records(out)):
        assert time.time() < deadline, tail(log)
        assert job_info(slurm, job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), tail(log)
        time.sleep(0.2)
    info = job_info(slurm, job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    run(["scancel", "--batch", "--signal=TERM", job], env=slurm["env"])

    # The job requeues itself and waits out Slurm's requeue delay; meanwhile the checkpoint is there.
    deadline = time.time() + 120
    while not ((info := job_info(slurm, job)).get("JobState") == "PENDING" and info.get("Restarts") == "1"):
        assert time.time() < deadline and info.get("JobState") in (
            "RUNNING", "COMPLETING", "PENDING", "REQUEUED", "CONFIGURING"), (info.get("JobState"), tail(log))
        time.sleep(0.5)
    saved = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*")
                   if (p / "COMPLETE").is_file())
    assert len(saved) == 1, (saved, tail(log))
    stop_step, ckpt = saved[0]
    assert 3 <= stop_step < steps, (stop_step, tail(log))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == stop_step
    text = log.read_text()
    assert f"stopped by SIGTERM at step {stop_step}/{steps}" in text, tail(log)
    assert re.search(r"--node_rank=0 .*--module", text) and re.search(r"--node_rank=1 .*--module", text), tail(log)

    # Start it now rather than after the delay, but not within the second of the
    # requeue: slurmd refuses a credential issued in the second it revoked the old one.
    time.sleep(2)
    run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm["env"])
    info = wait_job(slurm, job, ("COMPLETED",), RUN_TIMEOUT, log)
    assert info["Restarts"] == "1", info
    text = log.read_text()
    assert f"resumed from {ckpt} at step {stop_step}/{steps}" in text, tail(log)
    final = out / "checkpoints" / f"step-{steps}"
    assert (final / "COMPLETE").is_file(), tail(log)
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    train_steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert train_steps == list(range(1, steps + 1)), "the resumed run's log does not continue the first one"
    print(f"\nslurm job {job}: SIGTERM at step {stop_step} -> checkpoint {ckpt.name}, requeued, resumed; "
          f"{state_line(slurm, job)}; final checkpoint {final}")


def _records(out: Path) -> list[dict]:
    try:
        return metrics(out)
    except (OSError, json.JSONDecodeError):
        return []


def test_slurm_sweep_array_and_eval_job_launch_the_right_commands(tiny, slurm):
    """A job array over 2 methods × 2 seeds, and an eval job; launcher commands printed instead of run."""
    env = {**slurm["env"], "METHODS": "lora reflora", "SEEDS": "5 6", "LAUNCH_DRY_RUN": "1",
           "SWEEP_DIR": str(tiny["root"] / "sweep")}
    log, eval_log = tiny["root"] / "sweep-%a.out", tiny["root"] / "eval.out"
    submit = lambda *args: run(["sbatch", "--parsable", *args], env=env, cwd=ROOT).stdout.strip()  # noqa: E731
    jobs = [submit("--array=0-3", f"--output={log}", SLURM / "sweep.sbatch", "run.yaml"),
            submit(f"--output={eval_log}", SLURM / "eval.sbatch", "--adapter", "a/adapter", "--data", "test.json")]
    deadline = time.time() + 120
    while run(["squeue", "-h", "-j", ",".join(jobs)], env=env, check=False).stdout.strip():
        assert time.time() < deadline, run(["squeue"], env=env, check=False).stdout
        time.sleep(0.5)
    outputs = {i: Path(str(log).replace("%a", str(i))) for i in range(4)}
    for job in jobs:
        states = re.findall(r"JobState=(\w+)", run(["scontrol", "show", "job", job], env=env).stdout)
        assert states and set(states) == {"COMPLETED"}, (job, states, [tail(p) for p in [*outputs.values(), eval_log]])
    assert len(re.findall(r"JobState=", run(["scontrol", "show", "job", jobs[0]], env=env).stdout)) == 4
    expected = {0: ("lora", "5"), 1: ("reflora", "5"), 2: ("lora", "6"), 3: ("reflora", "6")}
    for i, (method, seed) in expected.items():
        text = outputs[i].read_text()
        assert re.search(rf"--module reflora_ds train run\.yaml --method {method} --seed {seed} "
                         rf"--output-dir \S+/sweep/{method}-seed{seed}\b", text), text
    assert re.search(r"deepspeed\.launcher\.runner --num_gpus 1 --master_port \d+ --module reflora_ds eval "
                     r"--adapter a/adapter --data test\.json", eval_log.read_text()), tail(eval_log)
