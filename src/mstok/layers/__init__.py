"""Transformer core: attention, blocks, embeddings, heads and weight initialisation."""

from mstok.layers.adaln import AdaLNZeroBlock, FinalLayer, LabelEmbedding, TimestepEmbedding
from mstok.layers.attention import CrossAttention, SelfAttention
from mstok.layers.blocks import MLP, CrossAttentionBlock, SelfAttentionBlock, Transformer
from mstok.layers.embeddings import PatchEmbed, PatchTokens, PixelHead, ProxyCodeHead, build_head
from mstok.layers.init import init_weights
from mstok.layers.joint import JointAttention, JointBlock, JointTransformer
from mstok.layers.rope import Grid2D, Line1D, NoRotation, RotaryTables, apply_rope

__all__ = [
    "MLP",
    "AdaLNZeroBlock",
    "CrossAttention",
    "CrossAttentionBlock",
    "FinalLayer",
    "Grid2D",
    "JointAttention",
    "JointBlock",
    "JointTransformer",
    "LabelEmbedding",
    "Line1D",
    "NoRotation",
    "PatchEmbed",
    "PatchTokens",
    "PixelHead",
    "ProxyCodeHead",
    "RotaryTables",
    "SelfAttention",
    "SelfAttentionBlock",
    "TimestepEmbedding",
    "Transformer",
    "apply_rope",
    "build_head",
    "init_weights",
]
