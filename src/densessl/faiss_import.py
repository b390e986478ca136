"""The one place densessl imports faiss: a missing faiss fails here with the install command.

faiss is an extra, not a core dependency, because ``faiss-cpu`` and ``faiss-gpu-cu12`` (and conda's
``faiss-gpu``) all ship the same ``faiss`` package and would overwrite each other: exactly one of
them must be installed (``pip install -e ".[cpu]"`` or ``pip install -e ".[gpu]"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

FAISS_INSTALL_HINT = (
    "densessl's evaluators (overclustering, Hummingbird retrieval) need faiss, which is not installed. "
    'Install exactly one faiss: pip install -e ".[cpu]" (faiss-cpu) or pip install -e ".[gpu]" '
    "(faiss-gpu-cu12, CUDA 12), or with conda: conda install -c conda-forge faiss-gpu (see environment.yaml)."
)


def import_faiss() -> ModuleType:
    """Import and return faiss; if it is missing, raise ImportError naming the extras that install it."""
    try:
        import faiss
    except ModuleNotFoundError as error:
        if error.name != "faiss":  # faiss itself is there but one of its own imports failed: show that.
            raise
        raise ModuleNotFoundError(FAISS_INSTALL_HINT, name="faiss") from error
    return faiss


def check_faiss_gpu(gpu: bool) -> None:
    """Raise ValueError when ``gpu`` is asked for but faiss has no GPU support or sees no GPU."""
    # No silent CPU fallback: a GPU run that quietly takes hours on the CPU is worse than an error.
    if gpu and import_faiss().get_num_gpus() == 0:
        raise ValueError(
            "gpu=True needs a faiss build with GPU support and a visible GPU: install faiss-gpu instead of faiss-cpu "
            '(pip uninstall faiss-cpu && pip install -e ".[gpu]", or conda-forge faiss-gpu) or pass gpu=False'
        )


@contextmanager
def faiss_threads(num_threads: int) -> Iterator[None]:
    """faiss's OpenMP thread count set to ``num_threads`` for the block, restored after."""
    faiss = import_faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
