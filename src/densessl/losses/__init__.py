from densessl.losses.densecl import dense_correspondence, densecl_loss, info_nce
from densessl.losses.neco import neco_loss, sort_loss
from densessl.losses.sorting import soft_permutation

__all__ = ["dense_correspondence", "densecl_loss", "info_nce", "neco_loss", "sort_loss", "soft_permutation"]
