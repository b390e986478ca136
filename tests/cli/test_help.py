"""--help of experiments/train.py and of each evaluation CLI: a usage with examples and only the config
groups that apply to that entry point (helpers/forked_runs.py: one torch import for all of them)."""
import os

import pytest

from helpers.forked_runs import launch
from helpers.tiny_runs import ROOT

SCRIPTS = ["experiments/train.py", "evaluation/overcluster.py", "evaluation/linear.py", "evaluation/retrieval.py",
           "evaluation/dse.py"]
TRAIN_GROUPS = ("experiment", "method", "backbone", "data", "trainer", "logger", "callbacks", "hydra/launcher")


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, tuple[int, str]]:
    tmp = tmp_path_factory.mktemp("help")
    specs = [{"script": s, "args": ["--help"], "cwd": str(tmp), "log": str(tmp / f"{i}.log")}
             for i, s in enumerate(SCRIPTS)]
    return dict(zip(SCRIPTS, launch(specs, tmp / "specs.json", {**os.environ, "OMP_NUM_THREADS": "1"})))


def _groups(text: str) -> set[str]:
    """Names of the groups listed under 'Config groups'."""
    block = text.split("Config groups", 1)[1].split("\n\n", 1)[0]
    return {line.split(":")[0].strip() for line in block.splitlines()[1:] if line.startswith("  ") and
            not line.startswith("      ")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_a_usage_with_examples_and_the_groups_that_apply(helps, script):
    code, text = helps[script]
    assert code == 0, text[-3000:]
    assert f"Usage: python {script}" in text and "Examples:" in text and f"python {script} " in text
    assert _groups(text) == (set(TRAIN_GROUPS) if script.startswith("experiments") else {"backbone", "data"}), text
    assert "dinov2_vitg14" in text and "== Config ==" not in text  # options listed; no config dump
    assert not any(len(line) > 120 for line in text.splitlines()), text
