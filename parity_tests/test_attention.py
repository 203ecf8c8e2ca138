"""pare.models.attention.Attention against diffusers' Attention (default SDPA processor)."""

import torch
from diffusers.models.attention_processor import Attention as TheirAttention
from hypothesis import given
from hypothesis import strategies as st

from pare.models.attention import Attention
from parity_tests.harness import check_block
from parity_tests.strategies import batch_sizes, seeds


@given(heads=st.integers(1, 4), dim_head=st.integers(1, 16), query_dim=st.integers(1, 24),
       cross=st.none() | st.integers(1, 24), tokens=st.integers(1, 40), context=st.integers(1, 20),
       bias=st.booleans(), upcast=st.booleans(), batch=batch_sizes, seed=seeds)
def test_attention_matches_diffusers(device, dtype, heads, dim_head, query_dim, cross, tokens, context, bias, upcast,
                                     batch, seed):
    kw = dict(query_dim=query_dim, cross_attention_dim=cross, heads=heads, dim_head=dim_head, bias=bias,
              upcast_attention=upcast)
    torch.manual_seed(seed)
    x = torch.randn(batch, tokens, query_dim)
    ctx = None if cross is None else torch.randn(batch, context, cross)
    check_block(f"Attention(heads={heads}, d={dim_head}, cross={cross})", Attention(**kw), TheirAttention(**kw),
                (x,), {"encoder_hidden_states": ctx}, dtype=dtype, device=device)


@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), head_dim=st.integers(1, 8), h=st.integers(2, 9),
       w=st.integers(1, 9), scale=st.sampled_from([1.0, 2.0]), batch=batch_sizes, seed=seeds)
def test_vae_style_spatial_attention_matches_diffusers(device, dtype, groups, per_group, head_dim, h, w, scale,
                                                       batch, seed):
    # The VAE mid-block's attention: GroupNorm first, residual added, output rescaled, on (B, C, H, W).
    c = groups * per_group * head_dim
    kw = dict(query_dim=c, heads=c // head_dim, dim_head=head_dim, rescale_output_factor=scale, eps=1e-6,
              norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
              _from_deprecated_attn_block=True)
    torch.manual_seed(seed)
    theirs = TheirAttention(**kw)
    theirs.group_norm.weight.data.normal_(1, 0.2)
    theirs.group_norm.bias.data.normal_(0, 0.2)
    check_block("Attention(spatial, VAE)", Attention(**kw), theirs, (torch.randn(batch, c, h, w),),
                dtype=dtype, device=device)


def test_attention_mask_is_an_additive_bias(device):
    torch.manual_seed(0)
    kw = dict(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    mask = torch.zeros(2, 1, 7)
    mask[:, :, 4:] = -10000.0  # the last three context tokens are padding
    check_block("Attention(masked)", Attention(**kw), TheirAttention(**kw), (x, ctx, mask), device=device)
    # ... and masking really changes the result (same as attending to the first four tokens only).
    ours = Attention(**kw).eval()
    assert torch.allclose(ours(x, ctx, mask), ours(x, ctx[:, :4]), atol=1e-5)
