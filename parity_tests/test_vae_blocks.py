"""pare.models.vae_blocks against their twins in diffusers.models.unets.unet_2d_blocks."""

import torch
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D as TheirDown
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D as TheirMid
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D as TheirUp
from hypothesis import given
from hypothesis import strategies as st

from pare.models.vae_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from parity_tests.harness import check_block
from parity_tests.strategies import activations, feature_maps, group_norm_channels, seeds


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, norms and biases included (default init hides affine and bias bugs)."""
    for p in module.parameters():
        p.data.normal_(0, 0.3)
    return module


def common_groups(groups: int, *channels: int) -> int:
    """The largest group count <= `groups` dividing every channel count: one `resnet_groups` serves all norms."""
    return next(g for g in range(groups, 0, -1) if all(c % g == 0 for c in channels))


@given(io=st.tuples(group_norm_channels(), group_norm_channels()), num_layers=st.integers(1, 3),
       add_downsample=st.booleans(), padding=st.sampled_from([0, 1]), act=activations,
       scale=st.sampled_from([1.0, 2.0]), data=st.data(), seed=seeds)
def test_down_encoder_block_matches_diffusers(device, dtype, io, num_layers, add_downsample, padding, act, scale,
                                              data, seed):
    (groups, c_in), (_, c_out) = io
    kw = dict(in_channels=c_in, out_channels=c_out, num_layers=num_layers, resnet_eps=1e-6, resnet_act_fn=act,
              resnet_groups=common_groups(groups, c_in, c_out), output_scale_factor=scale,
              add_downsample=add_downsample, downsample_padding=padding)
    torch.manual_seed(seed)
    b, _, h, w = data.draw(feature_maps(c_in, min_side=2))
    check_block(f"DownEncoderBlock2D({c_in}->{c_out}, layers={num_layers}, down={add_downsample}, pad={padding})",
                DownEncoderBlock2D(**kw), randomise(TheirDown(**kw)), (torch.randn(b, c_in, h, w),),
                dtype=dtype, device=device)


@given(io=st.tuples(group_norm_channels(), group_norm_channels()), num_layers=st.integers(1, 3),
       add_upsample=st.booleans(), temb=st.none() | st.integers(1, 8), act=activations,
       scale=st.sampled_from([1.0, 2.0]), data=st.data(), seed=seeds)
def test_up_decoder_block_matches_diffusers(device, dtype, io, num_layers, add_upsample, temb, act, scale, data, seed):
    (groups, c_in), (_, c_out) = io
    kw = dict(in_channels=c_in, out_channels=c_out, num_layers=num_layers, resnet_eps=1e-6, resnet_act_fn=act,
              resnet_groups=common_groups(groups, c_in, c_out), output_scale_factor=scale,
              add_upsample=add_upsample, temb_channels=temb)
    torch.manual_seed(seed)
    b, _, h, w = data.draw(feature_maps(c_in, min_side=2))
    args = (torch.randn(b, c_in, h, w), None if temb is None else torch.randn(b, temb))
    check_block(f"UpDecoderBlock2D({c_in}->{c_out}, layers={num_layers}, up={add_upsample}, temb={temb})",
                UpDecoderBlock2D(**kw), randomise(TheirUp(**kw)), args, dtype=dtype, device=device)


@given(gc=group_norm_channels(), heads=st.integers(1, 3), num_layers=st.integers(1, 2), add_attention=st.booleans(),
       attn_groups=st.none() | st.integers(1, 4), temb=st.none() | st.integers(1, 8), act=activations,
       scale=st.sampled_from([1.0, 2.0]), data=st.data(), seed=seeds)
def test_mid_block_matches_diffusers(device, dtype, gc, heads, num_layers, add_attention, attn_groups, temb, act, scale,
                                     data, seed):
    groups, per = gc
    c = groups * per * heads  # divisible by the groups and by the head count
    if attn_groups is not None:
        attn_groups = common_groups(attn_groups, c)
    kw = dict(in_channels=c, temb_channels=temb, num_layers=num_layers, resnet_eps=1e-6, resnet_act_fn=act,
              resnet_groups=groups, attn_groups=attn_groups, add_attention=add_attention,
              attention_head_dim=c // heads, output_scale_factor=scale)
    torch.manual_seed(seed)
    b, _, h, w = data.draw(feature_maps(c, min_side=2))
    args = (torch.randn(b, c, h, w), None if temb is None else torch.randn(b, temb))
    check_block(f"UNetMidBlock2D({c}, heads={heads}, layers={num_layers}, attn={add_attention}, temb={temb})",
                UNetMidBlock2D(**kw), randomise(TheirMid(**kw)), args, dtype=dtype, device=device)


def test_mid_block_as_the_vae_builds_it_matches_diffusers(device, dtype):
    # The exact call of diffusers' Encoder/Decoder: one head as wide as the channels, eps 1e-6, no temb.
    kw = dict(in_channels=16, temb_channels=None, resnet_eps=1e-6, resnet_act_fn="silu", output_scale_factor=1,
              attention_head_dim=16, resnet_groups=4, add_attention=True)
    torch.manual_seed(0)
    theirs = randomise(TheirMid(**kw))
    ours = UNetMidBlock2D(**kw)
    assert ours.attentions[0].heads == 1
    check_block("UNetMidBlock2D(VAE)", ours, theirs, (torch.randn(2, 16, 9, 7),), dtype=dtype, device=device)


def test_mid_block_without_attention_keeps_diffusers_layout():
    ours = UNetMidBlock2D(in_channels=8, resnet_groups=2, add_attention=False, num_layers=2)
    theirs = TheirMid(in_channels=8, temb_channels=None, resnet_groups=2, add_attention=False, num_layers=2)
    assert list(ours.attentions) == [None, None] and len(ours.resnets) == 3
    assert ours.state_dict().keys() == theirs.state_dict().keys()
