"""Stop signals, atomic checkpoints, resume=auto and exact resume: interrupted and resumed runs end with
bitwise the weights of one uninterrupted run (6 steps: 2 epochs of 3 batches)."""
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers.forked_runs import launch
from helpers.tiny_runs import ROOT, TINY_DATA

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
RUN = [*TINY_DATA, "data.max_images=6", "trainer.max_epochs=2", "logger=[csv]", "trainer.enable_progress_bar=false",
       "+experiment=quickstart", "++backbone.model_kwargs.depth=1", "eval_before_after=false", "method.queue_size=16",
       "backbone.img_size=32", "method.crops.global_size=32", "method.crops.local_size=16", "method.roi_size=2",
       "method.head.hidden_dim=32", "method.head.out_dim=16"]  # tiny: a step costs little next to a run's start
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "DENSESSL_CACHE": str(cache),
            "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}


def _specs(tmp_path: Path, *runs: list[str] | tuple[list[str], dict], cwd: Path = ROOT) -> list[dict]:
    """helpers/forked_runs.py specs of train.py runs in order (args, or (args, extra env))."""
    specs = []
    for i, run in enumerate(runs):
        args, env = run if isinstance(run, tuple) else (run, {})
        specs.append({"args": [*RUN, *args], "env": env, "cwd": str(cwd), "log": str(tmp_path / f"run{i}.log")})
    return specs


def _signal(step: int, name: str) -> list[str]:
    return ["+callbacks.kill._target_=signal_callback.SignalAtStep", f"+callbacks.kill.step={step}",
            f"+callbacks.kill.signal={name}"]


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 6
    a, b = a["state_dict"], b["state_dict"]
    assert a.keys() == b.keys()
    for k in a:  # student, teacher, heads and the NeCo queues
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# The run sequences of the tests below: name -> folder -> specs (the folder prepared as the test needs).
# All are run by one forked_runs process (one torch import for every run of the module), in order.
def _plan_straight(tmp: Path) -> list[dict]:
    return _specs(tmp, [f"hydra.run.dir={tmp / 'run'}"])


def _plan_signals(tmp: Path) -> list[dict]:
    run, fake = tmp / "run", tmp / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'scontrol.log'}\n")
    (fake / "scontrol").chmod(0o755)
    here = [f"hydra.run.dir={run}"]
    return _specs(tmp, [*here, *_signal(1, "SIGTERM")],
                  ([*here, "resume=auto", *_signal(3, "SIGUSR1")], {**SLURM, "PATH": f"{fake}:{os.environ['PATH']}"}),
                  ([*here, "resume=auto", *_signal(5, "SIGUSR2")], SLURM), [*here, "resume=auto"])


def _plan_mid_epoch(workers: int) -> Callable[[Path], list[dict]]:
    def plan(tmp: Path) -> list[dict]:
        here = [f"hydra.run.dir={tmp / 'run'}", f"data.num_workers={workers}"]
        return _specs(tmp, [*here, *_signal(2, "SIGTERM")], [*here, "resume=auto", *_signal(4, "SIGINT")],
                      [*here, "resume=auto"])
    return plan


CHAOS_RNG = random.Random(3)
CHAOS = [(step, CHAOS_RNG.choice(["SIGTERM", "SIGKILL"])) for step in sorted(CHAOS_RNG.sample(range(1, 7), 4))]


def _plan_chaos(tmp: Path) -> list[dict]:
    here = [f"hydra.run.dir={tmp / 'run'}", "data.num_workers=1", "callbacks.periodic_checkpoint.every_n_train_steps=1"]
    return _specs(tmp, *[[*here, "resume=auto", *_signal(step, name)] for step, name in CHAOS], [*here, "resume=auto"])


AUTO_KILL = ["+callbacks.kill._target_=signal_callback.SignalAtStep", "+callbacks.kill.step=${oc.env:KILL_STEP,0}",
             "resume=auto"]


def _plan_auto(tmp: Path) -> list[dict]:
    kill = AUTO_KILL
    return _specs(tmp, (kill, {"KILL_STEP": "2"}), kill, [*kill, "seed=1", "trainer.max_steps=1"],
                  [*kill, "trainer.max_epochs=3", "trainer.max_steps=7"], cwd=tmp)


def _plan_unreadable(tmp: Path) -> list[dict]:
    (tmp / "bad.ckpt").write_bytes(b"not a checkpoint")
    return _specs(tmp, [f"hydra.run.dir={tmp / 'c'}", f"resume={tmp / 'bad.ckpt'}"],
                  [f"hydra.run.dir={tmp / 'a'}", "trainer.max_epochs=1"],
                  [f"hydra.run.dir={tmp / 'b'}", "method.head.out_dim=64", f"resume={tmp / 'a'}"])


PLANS = {"straight": _plan_straight, "signals": _plan_signals, "mid_epoch_0": _plan_mid_epoch(0),
         "mid_epoch_1": _plan_mid_epoch(1), "chaos": _plan_chaos, "auto": _plan_auto, "unreadable": _plan_unreadable}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """(folder, [(exit code, output) of each run]) of every plan."""
    folders = {name: tmp_path_factory.mktemp(name) for name in PLANS}
    specs = {name: plan(folders[name]) for name, plan in PLANS.items()}
    outs = launch([s for name in PLANS for s in specs[name]], folders["straight"] / "runs.json", _env(cache))
    result, i = {}, 0
    for name in PLANS:
        result[name] = (folders[name], outs[i: i + len(specs[name])])
        i += len(specs[name])
    return result


@pytest.fixture(scope="module")
def straight(runs) -> dict:
    """last.ckpt of the uninterrupted run (data.num_workers=0)."""
    tmp, [(code, out)] = runs["straight"]
    assert code == 0, out[-3000:]
    return _checkpoint(tmp / "run")


def test_stop_signals_checkpoint_exit_nonzero_and_resume_exactly(runs, straight):
    """TERM at step 1, USR1 at step 3 (an epoch's end; SLURM: requeued by scontrol), USR2 at step 5
    (SLURM without scontrol); each resume continues in place (last.ckpt, no last-v1.ckpt)."""
    tmp_path, outs = runs["signals"]
    run = tmp_path / "run"
    expected = [(143, "SIGTERM", 1), (138, "SIGUSR1", 3), (140, "SIGUSR2", 5)]
    for (code, out), (want, name, step) in zip(outs, expected):
        assert code == want, out[-3000:]
        assert f"received {name}: checkpoint written to {run / 'checkpoints' / 'last.ckpt'} at step {step}" in out
    for (_, out), (_, _, step) in zip(outs[1:], expected):
        assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step {step})" in out
    assert "SLURM job 4242 requeued" in outs[1][1] and "scontrol not found: SLURM job 4242 not requeued" in outs[2][1]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert outs[-1][0] == 0, outs[-1][1][-3000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["epoch000-step3.ckpt", "epoch001-step6.ckpt", "last.ckpt"], names
    _assert_same_weights(_checkpoint(run), straight)


@pytest.mark.parametrize("workers", [0, 1])
def test_mid_epoch_stops_resume_exactly(runs, straight, workers):
    """SIGTERM after 2 of epoch 0's 3 batches, SIGINT (exit 130) after 1 of epoch 1's; with a
    data-loader worker the signals reach it too (the whole process group). Same weights as the
    straight 0-worker run."""
    tmp_path, outs = runs[f"mid_epoch_{workers}"]
    assert [code for code, _ in outs] == [143, 130, 0], outs[-1][1][-3000:]
    assert "received SIGINT: checkpoint written" in outs[1][1] and "(step 4)" in outs[2][1]
    _assert_same_weights(_checkpoint(tmp_path / "run"), straight)


def test_chaos_sigterm_and_sigkill_at_random_steps(runs, straight):
    """Killed four times at seeded random steps by SIGTERM or SIGKILL (a checkpoint every step, so a
    SIGKILL loses only the step in progress), resumed each time, one data-loader worker."""
    plan = CHAOS
    assert {name for _, name in plan} == {"SIGTERM", "SIGKILL"}, plan
    tmp_path, outs = runs["chaos"]
    assert [code for code, _ in outs] == [143 if name == "SIGTERM" else -9 for _, name in plan] + [0], plan
    for (_, out), (step, name) in zip(outs[1:], plan):  # a SIGKILL during step s resumes from s - 1
        assert f"(step {step if name == 'SIGTERM' else step - 1})" in out, out[-3000:]
    _assert_same_weights(_checkpoint(tmp_path / "run"), straight)


def test_resume_auto_relaunch_finds_its_run_folder(runs, straight):
    """Without hydra.run.dir, resume=auto puts the run in runs/auto/<method>_<config hash>. The same
    command (preempted by SIGTERM at step 2: the step comes from the environment, so the command does
    not change) continues it to the straight run's weights; with a larger max_epochs/max_steps it
    continues further; another config gets another folder."""
    tmp_path, outs = runs["auto"]
    assert [code for code, _ in outs] == [143, 0, 0, 0], outs[0][1][-3000:]
    folders = sorted((tmp_path / "runs" / "auto").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("neco_") for f in folders), folders
    first = next(f for f in folders if f"runs/auto/{f.name}/" in outs[0][1])
    assert "resume=auto: nothing to resume" in outs[0][1] and "resume=auto: nothing to resume" in outs[2][1]
    assert f"resuming from {first / 'checkpoints' / 'last.ckpt'} (step 2)" in outs[1][1]
    assert f"resuming from {first / 'checkpoints' / 'last.ckpt'} (step 6)" in outs[3][1]
    _assert_same_weights(torch.load(first / "checkpoints" / "epoch001-step6.ckpt", weights_only=False), straight)
    assert _checkpoint(first)["global_step"] == 7


def test_resume_auto_takes_last_ckpt_else_the_newest(tmp_path):
    from densessl.training import resolve_resume

    folder = tmp_path / "checkpoints"
    assert resolve_resume("auto", tmp_path) is None
    folder.mkdir()
    for name, mtime in (("epoch001-step6.ckpt", 2), ("epoch000-step3.ckpt", 3), ("last.ckpt", 1)):
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (mtime, mtime))
    assert resolve_resume("auto", tmp_path) == str(folder / "last.ckpt")
    (folder / "last.ckpt").unlink()
    assert resolve_resume("auto", tmp_path) == str(folder / "epoch000-step3.ckpt")


def test_checkpoint_killed_while_written_leaves_the_previous_one(tmp_path):
    """SIGKILL while AtomicCheckpointIO rewrites last.ckpt: the file still loads, whole."""
    path = tmp_path / "last.ckpt"
    code = (f"import torch; from densessl.callbacks import AtomicCheckpointIO; io = AtomicCheckpointIO()\n"
            f"io.save_checkpoint({{'v': torch.zeros(1)}}, {str(path)!r}); print('ready', flush=True)\n"
            f"while True: io.save_checkpoint({{'v': torch.ones(2 ** 24)}}, {str(path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env(tmp_path))
    assert proc.stdout.readline() == "ready\n"
    partial = tmp_path / "last.ckpt.partial"
    while not (partial.exists() and partial.stat().st_size > 0):
        pass
    proc.kill()
    proc.wait()
    saved = torch.load(path, weights_only=True)["v"]
    assert saved.numel() in (1, 2 ** 24) and saved.sum() in (0, 2 ** 24)


def test_unreadable_or_foreign_checkpoint_on_resume_is_a_clear_error(runs):
    _, outs = runs["unreadable"]
    assert [code for code, _ in outs] == [2, 0, 2], outs[1][1][-3000:]
    assert "error: cannot read checkpoint" in outs[0][1] and "bad.ckpt" in outs[0][1]
    assert "does not match this model" in outs[2][1]
    assert not any("Traceback" in out for _, out in outs)


def test_mid_epoch_checkpoint_on_another_world_size_is_a_start_up_error(tmp_path):
    """The loader position of a mid-epoch checkpoint counts batches per rank: resuming it on another
    number of processes would skip or repeat images, so it stops before training, naming the fix."""
    from densessl.training import check_resume_checkpoint

    model = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    (path.parent / "epoch000-step4.ckpt").write_bytes(b"")

    def save(data: dict) -> str:
        torch.save({"state_dict": model.state_dict(), "global_step": 5, "SSLDataModule": data}, path)
        return str(path)

    mid = save({"epoch": 1, "batches": 1, "world": 2})
    with pytest.raises(ValueError, match=r"mid-epoch \(batch 1 of epoch 1\) by a run on 2 process") as info:
        check_resume_checkpoint(mid, model, world_size=1)
    assert "trainer.devices" in str(info.value) and "epoch000-step4.ckpt" in str(info.value)
    assert check_resume_checkpoint(mid, model, world_size=2) == 5
    # an epoch-end position, or a checkpoint from before the world size was recorded: any world size
    assert check_resume_checkpoint(save({"epoch": 2, "batches": 0, "world": 2}), model, world_size=1) == 5
    assert check_resume_checkpoint(save({"epoch": 1, "batches": 1}), model, world_size=4) == 5
