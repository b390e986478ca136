from densessl.transforms.align import align_tokens, intersection, to_crop_frame
from densessl.transforms.color import ColorAugment, normalize_uint8
from densessl.transforms.multicrop import MultiCropWithBoxes, collate_multicrop, sample_box

__all__ = ["align_tokens", "intersection", "to_crop_frame", "ColorAugment", "normalize_uint8",
           "MultiCropWithBoxes", "collate_multicrop", "sample_box"]
