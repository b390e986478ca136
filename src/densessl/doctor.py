"""``python -m densessl.doctor``: what this machine can run, and the command that fixes each missing piece.

Prints the versions and availability of torch, CUDA, cuDNN and NCCL, the GPUs (name, memory, bf16),
faiss and whether its GPU build is usable, Lightning / timm / Hydra, the optional loggers (neptune,
wandb, mlflow) and the SLURM launcher (hydra-submitit-launcher). Always exits 0: it reports, it does
not judge; read the "To fix" lines at the end.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from typing import Any

_WIDTH = 26


def _line(label: str, value: Any) -> None:
    print(f"  {label:<{_WIDTH}} {value}")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable here"; say why
        return False, f"{type(error).__name__}: {error}".splitlines()[0][:120]
    return True, ""


def _torch_section(fixes: list[str]) -> int:
    print("PyTorch / CUDA")
    try:
        import torch
    except Exception as error:  # noqa: BLE001
        _line("torch", f"NOT IMPORTABLE ({error})")
        fixes.append("torch: pip install torch==2.14.1 torchvision==0.29.1 (CPU/CUDA wheel), or conda env create -f environment.yaml")
        return 0
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("torch", torch.__version__)
    _line("torchvision", _dist_version("torchvision") or "NOT INSTALLED")
    built_cuda = torch.version.cuda
    _line("torch built with CUDA", built_cuda or "no (CPU-only build)")
    cuda_ok = torch.cuda.is_available()
    _line("CUDA available", "yes" if cuda_ok else "no")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    _line("cuDNN", cudnn if cudnn is not None else "not available")
    try:
        import torch.distributed as dist

        nccl_ok = dist.is_available() and dist.is_nccl_available()
    except Exception:  # noqa: BLE001
        nccl_ok = False
    nccl = None
    if nccl_ok:
        try:
            nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001
            nccl = "available (version unknown)"
    _line("NCCL (multi-GPU DDP)", nccl or "not available (DDP can only use gloo, i.e. CPU)")
    count = torch.cuda.device_count() if cuda_ok else 0
    _line("GPUs", count)
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        _line(
            f"  cuda:{index}",
            f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}",
        )
    if cuda_ok:
        _line("bf16 on GPU", "yes (trainer.precision=bf16-mixed)" if torch.cuda.is_bf16_supported() else "no: use 16-mixed")
    else:
        _line("bf16 on GPU", "no GPU")
        _line("bf16 on CPU", "yes (bf16 autocast on CPU works, slowly)")
    if not cuda_ok:
        print()
        print("  NO GPU: training and evaluation run on the CPU (trainer=cpu, the default of the quickstarts).")
        print("  trainer=gpu and trainer=ddp need a GPU: here add trainer.accelerator=cpu to trainer=gpu, and")
        print("  trainer.accelerator=cpu trainer.devices=2 to trainer=ddp (CPU processes, gloo instead of NCCL);")
        print("  the evaluation CLIs' device=auto and eval.options.gpu=auto pick the CPU (backbone and faiss).")
        if built_cuda is None:
            fixes.append(
                "CUDA torch: this torch is a CPU-only build; on a GPU machine: conda env create -f environment.yaml, "
                "or pip install torch==2.14.1 torchvision==0.29.1 (the default Linux wheels are CUDA builds)"
            )
        else:
            fixes.append(
                f"GPU: torch is a CUDA {built_cuda} build but sees no GPU: run on a GPU machine, check nvidia-smi, "
                "the NVIDIA driver (new enough for CUDA " + built_cuda + ") and CUDA_VISIBLE_DEVICES"
            )
    return count


def _faiss_section(fixes: list[str], gpus: int) -> None:
    print("faiss")
    try:
        import faiss
    except ModuleNotFoundError as error:
        if error.name != "faiss":
            _line("faiss", f"BROKEN ({error})")
            return
        _line("faiss", "NOT INSTALLED (overclustering and retrieval evaluators need it)")
        fixes.append('faiss: pip install -e ".[cpu]" (faiss-cpu) or pip install -e ".[gpu]" (faiss-gpu-cu12); conda: faiss-gpu')
        return
    except Exception as error:  # noqa: BLE001
        _line("faiss", f"BROKEN ({type(error).__name__}: {error})")
        return
    dists = [name for name in ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss") if _dist_version(name)]
    _line("faiss", f"{getattr(faiss, '__version__', '?')} (pip: {', '.join(dists) or 'none, conda build?'})")
    gpu_build = hasattr(faiss, "StandardGpuResources")
    faiss_gpus = faiss.get_num_gpus() if gpu_build else 0
    _line("faiss GPU build", "yes" if gpu_build else "no (CPU build)")
    _line("faiss GPUs visible", faiss_gpus)
    if len(dists) > 1:
        fixes.append(f"faiss: several faiss distributions installed ({', '.join(dists)}), they overwrite each other: "
                     "uninstall all, then install exactly one")
    if gpus and not faiss_gpus:
        fixes.append('faiss GPU (eval.options.gpu=auto uses it on CUDA): pip uninstall -y faiss-cpu && '
                     'pip install -e ".[gpu]", or conda install -c conda-forge faiss-gpu')


def _libraries_section(fixes: list[str]) -> None:
    print("Libraries")
    for dist in ("lightning", "timm", "hydra-core", "omegaconf", "kornia", "torchmetrics", "numpy", "scipy"):
        version = _dist_version(dist)
        _line(dist, version or "NOT INSTALLED")
        if version is None:
            fixes.append(f"{dist}: pip install -e . (or conda env create -f environment.yaml)")


def _optional_section(fixes: list[str]) -> None:
    print("Optional")
    optional = [
        ("neptune (logger=neptune)", "neptune", 'pip install -e ".[neptune]"'),
        ("wandb (logger=wandb)", "wandb", 'pip install -e ".[wandb]"'),
        ("mlflow (logger=mlflow)", "mlflow", 'pip install -e ".[mlflow]"'),
        ("SLURM launcher", "hydra_plugins.hydra_submitit_launcher", 'pip install -e ".[slurm]"'),
    ]
    for label, module, fix in optional:
        ok, why = _importable(module)
        dist = {"hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher"}.get(module, module)
        _line(label, f"yes ({_dist_version(dist) or '?'})" if ok else f"no ({why})")
        if not ok:
            fixes.append(f"{label}: {fix}")


def main() -> int:
    fixes: list[str] = []
    print("densessl doctor")
    gpus = _torch_section(fixes)
    _faiss_section(fixes, gpus)
    _libraries_section(fixes)
    _optional_section(fixes)
    print()
    if fixes:
        print("To fix (only what you need):")
        for fix in fixes:
            print(f"  - {fix}")
    else:
        print("Nothing to fix.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
