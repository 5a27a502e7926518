"""Transformer core: attention, blocks, embeddings, heads and weight initialisation."""

from mstok.layers.adaln import AdaLNZeroBlock, FinalLayer, LabelEmbedding, TimestepEmbedding
from mstok.layers.attention import CrossAttention, SelfAttention
from mstok.layers.blocks import MLP, CrossAttentionBlock, SelfAttentionBlock, Transformer
from mstok.layers.embeddings import PatchEmbed, PatchTokens, PixelHead, ProxyCodeHead, build_head
from mstok.layers.init import init_weights

__all__ = [
    "MLP",
    "AdaLNZeroBlock",
    "CrossAttention",
    "CrossAttentionBlock",
    "FinalLayer",
    "LabelEmbedding",
    "PatchEmbed",
    "PatchTokens",
    "PixelHead",
    "ProxyCodeHead",
    "SelfAttention",
    "SelfAttentionBlock",
    "TimestepEmbedding",
    "Transformer",
    "build_head",
    "init_weights",
]
