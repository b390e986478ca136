from densessl.methods.base import NonFiniteLossError, SSLMethod
from densessl.methods.densecl import DenseCL
from densessl.methods.neco import NeCo

__all__ = ["NonFiniteLossError", "SSLMethod", "DenseCL", "NeCo"]
