from densessl.losses.densecl import dense_correspondence, densecl_loss, info_nce
from densessl.losses.dino import Centre, distill_ce, teacher_probs
from densessl.losses.ibot import IBOTLoss, masked_patch_loss
from densessl.losses.neco import neco_loss, sort_loss
from densessl.losses.sorting import soft_permutation
from densessl.losses.udi import UDILoss, multimodal_target

__all__ = ["dense_correspondence", "densecl_loss", "info_nce", "Centre", "distill_ce", "teacher_probs", "IBOTLoss",
           "masked_patch_loss", "neco_loss", "sort_loss", "soft_permutation", "UDILoss", "multimodal_target"]
