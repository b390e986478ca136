"""Where and how the evaluation CLIs run: the device (``device: auto``), faiss on the GPU or not, progress
bars and the output folder. One resolver each, shared by every CLI so they cannot drift apart."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_device(value: Any, key: str = "device") -> torch.device:
    """``auto`` (or None): CUDA when ``torch.cuda.is_available()``, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N`` are taken as given. A value torch does not know, or CUDA on a machine without a usable
    GPU, raises ValueError naming ``key`` and the fix (a CUDA error later, mid-run, would not)."""
    if value is None or str(value).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(value).strip())
    except RuntimeError:
        raise ValueError(f"{key}={value!r} is not a device: use auto (CUDA if available, else CPU), cpu, cuda "
                         f"or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={value!r}: the evaluators run on cpu or cuda; use {key}=auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={value} but torch sees no CUDA GPU here: pass {key}=auto or {key}=cpu "
                             f"(or run on a GPU machine with a CUDA build of torch)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{key}={value} but only {torch.cuda.device_count()} GPU(s) are visible: pass "
                             f"{key}=cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or {key}=auto")
    return device


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 with a CPU build of faiss (faiss-cpu) or no GPU."""
    from densessl.faiss_import import import_faiss

    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_faiss_gpu(value: Any, device: torch.device, key: str = "eval.options.gpu") -> bool:
    """faiss k-means / search on the GPU? ``auto`` (or None): when the evaluation runs on CUDA and faiss
    has GPU support, else on the CPU (logged, with the install that changes it). true / false as given
    (true without a GPU faiss fails in the evaluator with the install command)."""
    if isinstance(value, bool):
        return value
    if value is not None and str(value).strip().lower() != "auto":
        raise ValueError(f"{key}={value!r}: use auto (faiss on the GPU when device is CUDA and faiss has GPU "
                         f"support), true or false")
    if device.type != "cuda":
        return False
    if faiss_gpus() == 0:
        logger.info("faiss runs on the CPU: this faiss has no GPU support (pip uninstall -y faiss-cpu && "
                    "pip install -e \".[gpu]\", or conda-forge faiss-gpu, puts k-means and search on the GPU)")
        return False
    return True


def progress_bar(items: Iterable, *, enabled: bool = True, total: int | None = None, desc: str | None = None,
                 unit: str = "it") -> Any:
    """``items`` under a tqdm bar on stderr. Off when ``enabled`` is false (in-training callbacks, a
    ``progress: false`` option) and when stderr is not a terminal (log files, CI), so logs stay clean.
    Returns the tqdm object: iterate it, ``set_postfix_str`` on it (a no-op when off)."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=True if not enabled else None)


def timed_iter(items: Iterable[T], timings: dict[str, float], key: str) -> Iterator[T]:
    """Yield from ``items``, adding the time spent producing each item to ``timings[key]``."""
    iterator = iter(items)
    timings.setdefault(key, 0.0)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            timings[key] += time.perf_counter() - start
        yield item


def eval_folder(default: str, stamp: str, *, _root_: DictConfig) -> str:
    """``hydra.run.dir`` of the evaluation CLIs: ``<run folder>/eval/<protocol>/<stamp>`` when ``weights``
    is a densessl run folder (its figures stay with the run they describe), else ``default``."""
    weights = _root_.get("weights")
    if weights and (Path(str(weights)).expanduser() / "config.yaml").is_file():
        return str(Path(str(weights)).expanduser() / "eval" / str(_root_.eval.name) / stamp)
    return default


if not OmegaConf.has_resolver("densessl.eval_folder"):
    OmegaConf.register_new_resolver("densessl.eval_folder", eval_folder)
