"""pare.models.resnet.ResnetBlock2D against diffusers.models.resnet.ResnetBlock2D."""

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D as TheirResnet
from hypothesis import given
from hypothesis import strategies as st

from pare.models.resnet import ResnetBlock2D
from parity_tests.harness import check_block
from parity_tests.strategies import feature_maps, group_norm_channels, seeds


@given(io=st.tuples(group_norm_channels(), group_norm_channels()), temb=st.none() | st.integers(1, 16),
       norm=st.sampled_from(["default", "scale_shift"]), scale=st.sampled_from([1.0, 2.0]),
       skip_time_act=st.booleans(), data=st.data(), seed=seeds)
def test_resnet_block_matches_diffusers(device, dtype, io, temb, norm, scale, skip_time_act, data, seed):
    (groups, c_in), (groups_out, c_out) = io
    if temb is None:
        norm = "default"  # scale_shift is a FiLM by the time embedding
    groups = next(g for g in range(groups, 0, -1) if c_in % g == 0 and c_out % g == 0)  # one `groups` for both norms
    kw = dict(in_channels=c_in, out_channels=c_out, temb_channels=temb, groups=groups, eps=1e-5,
              time_embedding_norm=norm, output_scale_factor=scale, skip_time_act=skip_time_act)
    torch.manual_seed(seed)
    b, _, h, w = data.draw(feature_maps(c_in, min_side=2))
    args = (torch.randn(b, c_in, h, w), None if temb is None else torch.randn(b, temb))
    theirs = TheirResnet(**kw)
    for p in theirs.parameters():  # random norms and biases too
        p.data.normal_(0, 0.3)
    check_block(f"ResnetBlock2D({c_in}->{c_out}, temb={temb}, {norm})", ResnetBlock2D(**kw), theirs, args,
                dtype=dtype, device=device)


def test_resnet_block_without_temb_refuses_scale_shift():
    with pytest.raises(ValueError, match="scale_shift' needs temb_channels"):
        ResnetBlock2D(in_channels=4, temb_channels=None, groups=2, time_embedding_norm="scale_shift")
    with pytest.raises(ValueError, match=r"unknown time_embedding_norm 'ada_group'; expected one of \('default', 'scale_shift'\)"):
        ResnetBlock2D(in_channels=4, groups=2, time_embedding_norm="ada_group")


def test_resnet_block_with_temb_channels_needs_temb():
    block = ResnetBlock2D(in_channels=4, temb_channels=8, groups=2)
    with pytest.raises(ValueError, match="needs a time embedding"):
        block(torch.randn(1, 4, 4, 4), None)
