"""Install path: constraints.txt matches the installed versions, exactly one faiss per extra, the
faiss-missing error names the fix, environment.yaml is conda-forge only, and the doctor runs (in this
process: a subprocess would spend its time importing torch)."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _constraints() -> dict[str, str]:
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {raw!r} is not an exact pin name==version"
            pins[name.strip()] = version.strip()
    return pins


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's); 3.10 would need tomli
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(requirement: str) -> str:
    return _norm(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def test_constraints_match_installed_versions():
    pins = _constraints()
    assert {"torch", "torchvision", "lightning", "faiss-cpu", "pytest"} <= set(pins)
    wrong = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"constraints.txt (pinned, installed) differ: {wrong}; update constraints.txt"


def test_constraints_cover_the_direct_and_dev_dependencies():
    project = _project()
    extras = project["optional-dependencies"]
    wanted = {_req_name(r) for r in project["dependencies"] + extras["cpu"] + extras["test"]}
    assert wanted <= {_norm(name) for name in _constraints()}


def test_exactly_one_faiss_per_install():
    project = _project()
    extras = project["optional-dependencies"]

    def faiss_in(reqs):
        return [r for r in reqs if _req_name(r).startswith("faiss")]

    assert faiss_in(project["dependencies"]) == []
    assert [_req_name(r) for r in faiss_in(extras["cpu"])] == ["faiss-cpu"]
    assert [_req_name(r) for r in faiss_in(extras["gpu"])] == ["faiss-gpu-cu12"]
    assert faiss_in(extras["test"]) == []
    # The README's `pip install -e ".[dev]"` still installs faiss-cpu, through `cpu`, and not `gpu`.
    assert extras["dev"] == ["densessl[cpu,test]"]


def test_missing_faiss_names_the_extras(monkeypatch):
    from densessl.faiss_import import import_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=re.escape('pip install -e ".[cpu]"')) as info:
        import_faiss()
    assert '".[gpu]"' in str(info.value) and info.value.name == "faiss"


def test_faiss_is_imported_only_through_the_helper():
    # doctor.py imports faiss itself: it diagnoses a missing or broken faiss instead of raising.
    offenders = [str(p.relative_to(ROOT)) for p in (SRC / "densessl").rglob("*.py")
                 if p.name not in ("faiss_import.py", "doctor.py") and re.search(r"^\s*(import faiss|from faiss)", p.read_text(), re.M)]
    assert offenders == []


def test_evaluator_import_without_faiss_fails_with_the_fix(monkeypatch):
    # In this process (a fresh one costs a torch import): the evaluators imported anew with faiss missing,
    # then every module as it was.
    import densessl

    saved = dict(sys.modules)
    monkeypatch.setitem(sys.modules, "faiss", None)
    for name in [m for m in sys.modules if m.startswith("densessl.evaluation")]:
        del sys.modules[name]
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            importlib.import_module("densessl.evaluation.overcluster")
    finally:
        for name in [m for m in sys.modules if m.startswith("densessl.evaluation") and m not in saved]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if k.startswith("densessl.evaluation")})
        if "densessl.evaluation" in saved:
            densessl.evaluation = saved["densessl.evaluation"]
    assert 'pip install -e ".[cpu]"' in str(info.value) and 'pip install -e ".[gpu]"' in str(info.value)


def test_environment_yaml_is_conda_forge_only_with_gpu_builds():
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    names = {re.split(r"[<>=! ]", d, maxsplit=1)[0] for d in conda}
    assert {"pytorch-gpu", "faiss-gpu", "cuda-version"} <= names
    assert not names & {"pytorch-cuda", "faiss-cpu", "cudatoolkit", "pytorch"}
    # Every core dependency of pyproject.toml is in the environment (conda names for two of them).
    project = _project()
    conda_name = {"torch": "pytorch-gpu", "matplotlib": "matplotlib-base"}
    missing = {_req_name(r) for r in project["dependencies"]} - {_req_name(n) for n in names} - set(conda_name)
    assert missing == set(), missing


def test_doctor_runs_and_reports(capsys):
    from densessl.doctor import main

    assert main() == 0
    out = capsys.readouterr().out
    import torch

    for key in ("torch ", "CUDA available", "cuDNN", "NCCL", "GPUs", "bf16", "faiss GPU build", "lightning",
                "timm", "hydra-core", "neptune", "wandb", "mlflow", "SLURM launcher"):
        assert key in out, f"doctor output lacks {key!r}:\n{out}"
    assert f"torch                      {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "NO GPU" in out and "trainer.accelerator=cpu" in out
    assert "To fix" in out or "Nothing to fix" in out


def test_doctor_is_a_module_entry_point():
    # `python -m densessl.doctor` (the README's command) runs main() and exits with its status
    source = (SRC / "densessl" / "doctor.py").read_text()
    assert 'if __name__ == "__main__":\n    sys.exit(main())' in source
