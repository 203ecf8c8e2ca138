"""pare.models.transformer (GEGLU, FeedForward, BasicTransformerBlock, Transformer2DModel) against diffusers."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TheirBlock
from diffusers.models.attention import FeedForward as TheirFeedForward
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TheirTransformer2D
from hypothesis import given
from hypothesis import strategies as st

from pare.models.transformer import BasicTransformerBlock, FeedForward, Transformer2DModel
from pare.parity.checkpoint import perturb_norms
from parity_tests.harness import check_block
from parity_tests.strategies import batch_sizes, feature_maps, group_norm_channels, seeds


@given(dim=st.integers(1, 48), mult=st.integers(1, 4), dim_out=st.none() | st.integers(1, 16),
       tokens=st.integers(1, 20), batch=batch_sizes, seed=seeds)
def test_geglu_feed_forward_matches_diffusers(device, dtype, dim, mult, dim_out, tokens, batch, seed):
    torch.manual_seed(seed)
    kw = dict(dim=dim, dim_out=dim_out, mult=mult, activation_fn="geglu")
    check_block(f"FeedForward(geglu, {dim}x{mult})", FeedForward(**kw), TheirFeedForward(**kw),
                (torch.randn(batch, tokens, dim),), dtype=dtype, device=device)


@given(dim=st.integers(1, 32), heads=st.integers(1, 4), head_dim=st.integers(1, 16),
       cross=st.none() | st.integers(1, 24), tokens=st.integers(1, 30), context=st.integers(1, 12),
       bias=st.booleans(), upcast=st.booleans(), batch=batch_sizes, seed=seeds)
def test_basic_transformer_block_matches_diffusers(device, dtype, dim, heads, head_dim, cross, tokens, context, bias,
                                                   upcast, batch, seed):
    torch.manual_seed(seed)
    kw = dict(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=cross,
              attention_bias=bias, upcast_attention=upcast)
    theirs = TheirBlock(**kw)
    perturb_norms(theirs, seed)
    ctx = None if cross is None else torch.randn(batch, context, cross)
    check_block(f"BasicTransformerBlock(dim={dim}, {heads}x{head_dim}, cross={cross})", BasicTransformerBlock(**kw),
                theirs, (torch.randn(batch, tokens, dim),), {"encoder_hidden_states": ctx}, dtype=dtype, device=device)


@given(gc=group_norm_channels(), heads=st.integers(1, 4), head_dim=st.integers(1, 12), layers=st.integers(1, 2),
       linear=st.booleans(), cross=st.integers(1, 24), context=st.integers(1, 10), data=st.data(), seed=seeds)
def test_transformer_2d_matches_diffusers(device, dtype, gc, heads, head_dim, layers, linear, cross, context, data,
                                          seed):
    groups, channels = gc
    kw = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, num_layers=layers,
              norm_num_groups=groups, cross_attention_dim=cross, use_linear_projection=linear)
    torch.manual_seed(seed)
    b, _, h, w = data.draw(feature_maps(channels, min_side=2))  # odd sides too: tokens are H*W, any H, W
    theirs = TheirTransformer2D(**kw)
    perturb_norms(theirs, seed)
    check_block(f"Transformer2DModel({'linear' if linear else 'conv'}, {heads}x{head_dim}, layers={layers})",
                Transformer2DModel(**kw), theirs, (torch.randn(b, channels, h, w),),
                {"encoder_hidden_states": torch.randn(b, context, cross)}, dtype=dtype, device=device)


def test_transformer_2d_with_text_mask_matches_diffusers(device, dtype):
    torch.manual_seed(0)
    kw = dict(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2, cross_attention_dim=6)
    bias = torch.zeros(2, 1, 7)
    bias[0, :, 5:] = -10000.0  # the first prompt's last two tokens are padding
    theirs = TheirTransformer2D(**kw)
    perturb_norms(theirs, 0)
    check_block("Transformer2DModel(masked)", Transformer2DModel(**kw), theirs, (torch.randn(2, 8, 3, 5),),
                {"encoder_hidden_states": torch.randn(2, 7, 6), "encoder_attention_mask": bias},
                dtype=dtype, device=device)


def test_feed_forward_names_the_activations_it_has():
    with pytest.raises(ValueError, match=r"activation_fn='swiglu' is not implemented in pare; SD's UNets use one of \('geglu',\)"):
        FeedForward(8, activation_fn="swiglu")
