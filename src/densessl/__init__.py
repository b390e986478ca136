"""densessl: dense self-supervised learning of vision backbones."""
__version__ = "0.1.0"

import logging as _logging

# faiss announces at INFO which SIMD build it loads; Hydra's default logging would print it every run.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
