"""hydra/launcher=slurm: nodes and GPUs written once, resume=auto by default, the missing-launcher error,
and the preemption path of a SLURM job (SIGUSR2 from outside, scontrol requeue, the requeued job resumes)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from test_resume import HELPERS, RUN, SLURM

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(ROOT / "experiments" / "train.py")]


def _compose(*overrides: str):
    import densessl.training  # noqa: F401  registers the config's resolvers
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_sets_nodes_and_gpus_once_and_resume_auto():
    cfg = _compose("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.hydra.launcher.tasks_per_node) == (2, 4, 4)
    assert cfg.resume == "auto"
    assert _compose("hydra/launcher=slurm", "resume=none").resume == "none"
    plain = _compose("trainer=ddp")
    assert (plain.trainer.num_nodes, plain.trainer.devices, plain.resume) == (1, -1, None)


def test_missing_submitit_launcher_is_one_line_naming_the_extra(tmp_path):
    """Run as if hydra-submitit-launcher were not installed (its module hidden)."""
    code = ("import runpy, sys; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None; "
            f"sys.argv = [{str(ROOT / 'experiments' / 'train.py')!r}, '-m', 'hydra/launcher=slurm']; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == ('error: hydra/launcher=slurm needs hydra-submitit-launcher, which is not '
                                   'installed: pip install -e ".[slurm]"')
    assert not list(tmp_path.iterdir())  # nothing written


def test_sigusr2_from_slurm_requeues_and_the_requeued_job_resumes(tmp_path):
    """The job as SLURM runs it (SLURM_* set, hydra/launcher=slurm so resume defaults to auto) gets
    SIGUSR2, which submitit has SLURM send before the time limit, from outside to its process group
    after step 2: last.ckpt at step 2, `scontrol requeue <job>` run (a fake scontrol first on PATH
    records it), exit 140. The same command again, as the requeued job, resumes from step 2 and ends."""
    run, fake, ready = tmp_path / "run", tmp_path / "bin", tmp_path / "ready"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, **SLURM, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
           "DENSESSL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    cmd = [*TRAIN, *RUN, "hydra/launcher=slurm", f"hydra.run.dir={run}",
           "+callbacks.wait._target_=wait_callback.WaitForSignalAtStep", "+callbacks.wait.step=2",
           f"+callbacks.wait.ready={ready}"]
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not ready.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), log.read_text()[-3000:]
        os.killpg(job.pid, signal.SIGUSR2)  # SLURM signals every process of the job step
        assert job.wait(timeout=300) == 128 + signal.SIGUSR2, log.read_text()[-3000:]
    first = log.read_text()
    last = run / "checkpoints" / "last.ckpt"
    assert f"received SIGUSR2: checkpoint written to {last} at step 2" in first, first[-3000:]
    assert "SLURM job 4242 requeued" in first
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert OmegaConf.load(run / "config.yaml").resume == "auto"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resuming from {last} (step 2)" in again.stdout
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again
