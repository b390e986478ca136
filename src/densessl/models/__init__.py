from densessl.models.backbone import ARCHS, Backbone, WeightsError, build_backbone, extract_backbone_state
from densessl.models.ema import cosine_momentum, ema_update, make_teacher
from densessl.models.heads import DINOHead, ProjectionHead

__all__ = ["ARCHS", "Backbone", "WeightsError", "build_backbone", "extract_backbone_state", "cosine_momentum",
           "ema_update", "make_teacher", "DINOHead", "ProjectionHead"]
