"""``trainer=fsdp``: Lightning's FSDPStrategy that shards the timm backbones block by block.

Untested here: Lightning runs FSDP on CUDA only (this repository's tests construct the strategy and
check the export path on the CPU). Memory per GPU for NeCo with ViT-L/g: README, "Large backbones".
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from timm.models.convnext import ConvNeXtBlock
from timm.models.eva import EvaBlock, EvaBlockPostNorm
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block, ResPostBlock
from torch import nn

# The repeated units of the backbone families densessl builds: each becomes one FSDP unit (its
# parameters gathered for its forward/backward only) and, with activation checkpointing, one
# recomputed segment. Classes absent from a model are simply not matched.
BLOCKS: tuple[type[nn.Module], ...] = (Block, ResPostBlock, EvaBlock, EvaBlockPostNorm, ConvNeXtBlock, BasicBlock,
                                       Bottleneck)


def fsdp(activation_checkpointing: bool = True, sharding_strategy: str = "FULL_SHARD",
         state_dict_type: str = "full", cpu_offload: bool = False, **kwargs: Any) -> FSDPStrategy:
    """FSDPStrategy wrapping every block of :data:`BLOCKS`. Lightning's default ``use_orig_params=True``
    keeps the parameters addressable by name, as the methods' optimiser groups (no weight decay on
    norms and biases) and the teacher EMA need; ``state_dict_type="full"`` writes ordinary single-file
    checkpoints, which resume and ``backbone.weights=<run>`` read as under DDP."""
    blocks = set(BLOCKS)
    return FSDPStrategy(auto_wrap_policy=blocks, activation_checkpointing_policy=blocks if activation_checkpointing
                        else None, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                        cpu_offload=cpu_offload, **kwargs)
