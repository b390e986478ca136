from densessl.methods.base import NonFiniteLossError, SSLMethod
from densessl.methods.densecl import DenseCL
from densessl.methods.ibot import IBOT
from densessl.methods.neco import NeCo
from densessl.methods.supervised import Supervised
from densessl.methods.udi import UDI

__all__ = ["NonFiniteLossError", "SSLMethod", "DenseCL", "IBOT", "NeCo", "Supervised", "UDI"]
