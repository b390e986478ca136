"""Test-only: several runs of experiments/train.py in a row, each in its own process forked from this
one, so that torch, Lightning and Hydra are imported once (a fresh interpreter spends ~15 s importing
them on the test machine). Each run is a real process, in its own process group: signals, exit
statuses and files are those of `python experiments/train.py ARGS`.

python forked_runs.py SPEC.json, SPEC a list of {"args": [...], "env": {...}, "cwd": dir, "log": file}
(stdout and stderr of the run), optionally "script" (another entry point, relative to the repository:
evaluation/overcluster.py, ...) and "unset" (environment variables to remove). Prints the exit codes as
one JSON list (-N: killed by signal N).
From a test: launch(specs, ...) runs this script and returns (exit code, log text) per run."""
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parents[1] / "experiments" / "train.py"


def launch(specs: list[dict], spec_file: Path, env: dict[str, str], timeout: float = 600) -> list[tuple[int, str]]:
    """Run ``specs`` in order through this script (one subprocess, ``env`` plus this folder on PYTHONPATH
    so that specs can name test-only callbacks); (exit code, log text) of each run."""
    spec_file.write_text(json.dumps(specs))
    env = {**env, "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "forked_runs.py"), str(spec_file)], cwd=TRAIN.parents[1],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(code, Path(s["log"]).read_text()) for code, s in zip(codes, specs)]


def launch_cases(cases: dict, tmp: Path) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """``cases``: name -> (prepare(folder) or None, plan(folder) -> one spec or a list of specs). Each case
    gets its own folder under ``tmp`` and synthetic-data cache; all runs go through one :func:`launch`
    from the repository root with one thread. Returns name -> (folder, [(exit code, log text) per run])."""
    specs, counts = [], []
    for name, (prepare, plan) in cases.items():
        d = tmp / name
        d.mkdir()
        if prepare is not None:
            prepare(d)
        runs = plan(d)
        runs = [runs] if isinstance(runs, dict) else runs
        for i, run in enumerate(runs):
            run["env"] = {"DENSESSL_CACHE": str(d / "cache"), "HYDRA_FULL_ERROR": "1", **run.get("env", {})}
            specs.append({"cwd": str(TRAIN.parents[1]), **run, "log": str(d / f"run{i}.log")})
        counts.append(len(runs))
    outs = launch(specs, tmp / "runs.json", {**os.environ, "OMP_NUM_THREADS": "1"})
    result, i = {}, 0
    for name, n in zip(cases, counts):
        result[name] = (tmp / name, outs[i: i + n])
        i += n
    return result


def run(spec: dict) -> None:
    os.setpgrp()
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for name in spec.get("unset", []):
        os.environ.pop(name, None)
    os.environ.update(spec.get("env", {}))
    os.chdir(spec.get("cwd", os.getcwd()))
    script = str(TRAIN.parents[1] / spec["script"]) if "script" in spec else str(TRAIN)
    sys.argv = [script, *spec["args"]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    import hydra  # noqa: F401  the slow imports, once
    import lightning  # noqa: F401

    import densessl.methods  # noqa: F401
    import densessl.training  # noqa: F401

    codes = []
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        proc = multiprocessing.get_context("fork").Process(target=run, args=(spec,))
        proc.start()
        proc.join()
        codes.append(proc.exitcode)
    print(json.dumps(codes))
