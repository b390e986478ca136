"""densessl: dense self-supervised learning of vision backbones."""
__version__ = "0.1.0"
