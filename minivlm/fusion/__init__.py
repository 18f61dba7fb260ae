"""Multimodal projectors (fusion): how projected image tokens meet the text stream."""
from minivlm.fusion.base import FusedInputs
from minivlm.fusion.cross_attention import CrossAttentionFusion, GatedCrossAttentionBlock
from minivlm.fusion.prefix import PrefixFusion
from minivlm.fusion.splice import SpliceFusion

__all__ = ["FusedInputs", "SpliceFusion", "PrefixFusion", "CrossAttentionFusion", "GatedCrossAttentionBlock"]
