"""pare.models.unet_2d_blocks against diffusers.models.unets.unet_2d_blocks: each of SD's five block types.

Down blocks are judged on every state they return (the skips), not only on their output.
"""

import pytest
import torch
from diffusers.models.unets import unet_2d_blocks as theirs
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.models import unet_2d_blocks as ours
from pare.parity.checkpoint import perturb_norms
from parity_tests.harness import check_block
from parity_tests.strategies import feature_maps, seeds, unet_block_channels

TEMB = 8
norms = st.sampled_from(["default", "scale_shift"])


def all_states(output):
    """A down block returns (output, skips); the skips end with the output. Compare them all, flattened."""
    return torch.cat([state.flatten(1) for state in output[1]], dim=1)


def build(name, kw, seed):
    torch.manual_seed(seed)
    reference = getattr(theirs, name)(**kw)
    perturb_norms(reference, seed)
    return getattr(ours, name)(**kw), reference


def resnet_kw(groups, norm):
    return dict(temb_channels=TEMB, resnet_groups=groups, resnet_eps=1e-5, resnet_time_scale_shift=norm)


def attention_kw(heads, cross, linear, layers):
    return dict(num_attention_heads=heads, cross_attention_dim=cross, use_linear_projection=linear,
                transformer_layers_per_block=layers)


@given(ch=unet_block_channels(), num_layers=st.integers(1, 2), add_downsample=st.booleans(),
       padding=st.sampled_from([0, 1]), norm=norms, data=st.data(), seed=seeds)
def test_down_block_matches_diffusers(device, dtype, ch, num_layers, add_downsample, padding, norm, data, seed):
    groups, c_in, c_out, _ = ch
    kw = dict(in_channels=c_in, out_channels=c_out, num_layers=num_layers, add_downsample=add_downsample,
              downsample_padding=padding, **resnet_kw(groups, norm))
    b, _, h, w = data.draw(feature_maps(c_in, min_side=2))
    pare_block, reference = build("DownBlock2D", kw, seed)
    check_block(f"DownBlock2D({c_in}->{c_out}, layers={num_layers})", pare_block, reference,
                (torch.randn(b, c_in, h, w), torch.randn(b, TEMB)), dtype=dtype, device=device, output=all_states)


@settings(max_examples=6)
@given(ch=unet_block_channels(), num_layers=st.integers(1, 2), layers=st.sampled_from([1, 2, [2, 1]]),
       add_downsample=st.booleans(), linear=st.booleans(), cross=st.integers(1, 16), tokens=st.integers(1, 8),
       data=st.data(), seed=seeds)
def test_cross_attn_down_block_matches_diffusers(device, dtype, ch, num_layers, layers, add_downsample, linear, cross,
                                                 tokens, data, seed):
    groups, c_in, c_out, heads = ch
    layers = layers[:num_layers] if isinstance(layers, list) else layers  # an int, or one count per ResNet
    kw = dict(in_channels=c_in, out_channels=c_out, num_layers=num_layers, add_downsample=add_downsample,
              **resnet_kw(groups, "default"), **attention_kw(heads, cross, linear, layers))
    b, _, h, w = data.draw(feature_maps(c_in, min_side=2, max_side=9))
    pare_block, reference = build("CrossAttnDownBlock2D", kw, seed)
    check_block(f"CrossAttnDownBlock2D({c_in}->{c_out}, heads={heads}, layers={layers})", pare_block, reference,
                (torch.randn(b, c_in, h, w), torch.randn(b, TEMB)),
                {"encoder_hidden_states": torch.randn(b, tokens, cross)}, dtype=dtype, device=device,
                output=all_states)


@settings(max_examples=6)
@given(ch=unet_block_channels(), layers=st.integers(1, 2), linear=st.booleans(), scale=st.sampled_from([1.0, 2.0]),
       cross=st.integers(1, 16), tokens=st.integers(1, 8), data=st.data(), seed=seeds)
def test_mid_block_matches_diffusers(device, dtype, ch, layers, linear, scale, cross, tokens, data, seed):
    groups, _, channels, heads = ch
    kw = dict(in_channels=channels, output_scale_factor=scale, **resnet_kw(groups, "default"),
              **attention_kw(heads, cross, linear, layers))
    b, _, h, w = data.draw(feature_maps(channels, min_side=2, max_side=8))
    pare_block, reference = build("UNetMidBlock2DCrossAttn", kw, seed)
    check_block(f"UNetMidBlock2DCrossAttn({channels}, heads={heads}, layers={layers})", pare_block, reference,
                (torch.randn(b, channels, h, w), torch.randn(b, TEMB)),
                {"encoder_hidden_states": torch.randn(b, tokens, cross)}, dtype=dtype, device=device)


def up_inputs(data, c_in, c_prev, c_out, num_layers, odd_upsample):
    """hidden (B, C_prev, H, W), the skips (popped last first: the last-popped one has C_in), and the target size."""
    b, _, h, w = data.draw(feature_maps(c_prev, min_side=2, max_side=8))
    skips = tuple(torch.randn(b, c_in if i == num_layers - 1 else c_out, h, w) for i in reversed(range(num_layers)))
    # An odd skip size upstream: the UNet then upsamples to it instead of doubling.
    size = (2 * h - 1, 2 * w - 1) if odd_upsample else None
    return b, torch.randn(b, c_prev, h, w), skips, size


@given(ch=unet_block_channels(), prev=st.integers(1, 4), num_layers=st.integers(1, 3), add_upsample=st.booleans(),
       odd=st.booleans(), norm=norms, data=st.data(), seed=seeds)
def test_up_block_matches_diffusers(device, dtype, ch, prev, num_layers, add_upsample, odd, norm, data, seed):
    groups, c_in, c_out, _ = ch
    c_prev = groups * prev
    kw = dict(in_channels=c_in, prev_output_channel=c_prev, out_channels=c_out, num_layers=num_layers,
              add_upsample=add_upsample, **resnet_kw(groups, norm))
    b, hidden, skips, size = up_inputs(data, c_in, c_prev, c_out, num_layers, odd)
    pare_block, reference = build("UpBlock2D", kw, seed)
    check_block(f"UpBlock2D({c_prev}+{c_in}->{c_out}, layers={num_layers}, size={size})", pare_block, reference,
                (), {"hidden_states": hidden, "res_hidden_states_tuple": skips, "temb": torch.randn(b, TEMB),
                     "upsample_size": size}, dtype=dtype, device=device)


@settings(max_examples=6)
@given(ch=unet_block_channels(), prev=st.integers(1, 4), num_layers=st.integers(1, 3), layers=st.sampled_from([1, 2]),
       add_upsample=st.booleans(), odd=st.booleans(), linear=st.booleans(), cross=st.integers(1, 16),
       tokens=st.integers(1, 8), data=st.data(), seed=seeds)
def test_cross_attn_up_block_matches_diffusers(device, dtype, ch, prev, num_layers, layers, add_upsample, odd, linear,
                                               cross, tokens, data, seed):
    groups, c_in, c_out, heads = ch
    c_prev = groups * prev
    kw = dict(in_channels=c_in, prev_output_channel=c_prev, out_channels=c_out, num_layers=num_layers,
              add_upsample=add_upsample, **resnet_kw(groups, "default"), **attention_kw(heads, cross, linear, layers))
    b, hidden, skips, size = up_inputs(data, c_in, c_prev, c_out, num_layers, odd)
    pare_block, reference = build("CrossAttnUpBlock2D", kw, seed)
    check_block(f"CrossAttnUpBlock2D({c_prev}+{c_in}->{c_out}, heads={heads}, layers={layers})", pare_block,
                reference, (), {"hidden_states": hidden, "res_hidden_states_tuple": skips,
                                "temb": torch.randn(b, TEMB), "encoder_hidden_states": torch.randn(b, tokens, cross),
                                "upsample_size": size}, dtype=dtype, device=device)


COMMON = dict(num_layers=1, in_channels=4, out_channels=4, temb_channels=8, resnet_groups=2, cross_attention={})


@pytest.mark.parametrize("factory, name", [
    (ours.get_down_block, "AttnDownBlock2D"),
    (ours.get_down_block, "SimpleCrossAttnDownBlock2D"),
    (ours.get_up_block, "AttnUpBlock2D"),
    (ours.get_mid_block, "UNetMidBlock2DSimpleCrossAttn"),
])
def test_block_factories_name_the_unknown_type_and_the_known_ones(factory, name):
    with pytest.raises(ValueError) as error:
        factory(name, **COMMON)
    message = str(error.value)
    known = {ours.get_down_block: ours.DOWN_BLOCKS, ours.get_up_block: ours.UP_BLOCKS,
             ours.get_mid_block: ours.MID_BLOCKS}[factory]
    assert repr(name) in message and str(tuple(known)) in message


def test_block_factories_build_by_name_with_diffusers_legacy_prefix():
    assert isinstance(ours.get_down_block("UNetResDownBlock2D", **COMMON), ours.DownBlock2D)
    assert ours.get_mid_block(None, **COMMON) is None
    cross = dict(num_attention_heads=2, cross_attention_dim=4)
    block = ours.get_down_block("CrossAttnDownBlock2D", **{**COMMON, "cross_attention": cross})
    assert isinstance(block, ours.CrossAttnDownBlock2D) and block.attentions[0].transformer_blocks[0].attn1.heads == 2
