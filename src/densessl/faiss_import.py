"""The one place densessl imports faiss: a missing faiss fails here with the install command.

faiss is an extra, not a core dependency, because ``faiss-cpu`` and ``faiss-gpu-cu12`` (and conda's
``faiss-gpu``) all ship the same ``faiss`` package and would overwrite each other: exactly one of
them must be installed (``pip install -e ".[cpu]"`` or ``pip install -e ".[gpu]"``).
"""

from __future__ import annotations

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
