"""pare.models.resampling against diffusers' Downsample2D and Upsample2D."""

import pytest
import torch
from diffusers.models.downsampling import Downsample2D as TheirDown
from diffusers.models.upsampling import Upsample2D as TheirUp
from hypothesis import given
from hypothesis import strategies as st

from pare.models.resampling import Downsample2D, Upsample2D
from parity_tests.harness import check_block
from parity_tests.strategies import feature_maps, seeds


@given(c=st.integers(1, 12), c_out=st.none() | st.integers(1, 12), use_conv=st.booleans(),
       padding=st.sampled_from([0, 1]), data=st.data(), seed=seeds)
def test_downsample_matches_diffusers(device, dtype, c, c_out, use_conv, padding, data, seed):
    if not use_conv:
        c_out = None  # pooling keeps the channels
    torch.manual_seed(seed)
    x = torch.randn(*data.draw(feature_maps(c, min_side=2)))
    kw = dict(use_conv=use_conv, out_channels=c_out, padding=padding, name="op")
    check_block(f"Downsample2D(conv={use_conv}, pad={padding})", Downsample2D(c, **kw), TheirDown(c, **kw), (x,),
                dtype=dtype, device=device)


@given(c=st.integers(1, 12), c_out=st.none() | st.integers(1, 12), use_conv=st.booleans(),
       forced=st.booleans(), data=st.data(), seed=seeds)
def test_upsample_matches_diffusers(device, dtype, c, c_out, use_conv, forced, data, seed):
    torch.manual_seed(seed)
    x = torch.randn(*data.draw(feature_maps(c, max_side=8)))
    kw = dict(use_conv=use_conv, out_channels=c_out if use_conv else None)
    size = {"output_size": (2 * x.shape[2] + 1, 2 * x.shape[3] - 1)} if forced else {}
    check_block(f"Upsample2D(conv={use_conv}, {size})", Upsample2D(c, **kw), TheirUp(c, **kw), (x,), size,
                dtype=dtype, device=device)


def test_resampling_names_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expects 4 channels, got input of shape \(1, 3, 8, 8\)"):
        Downsample2D(4, use_conv=True)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="keeps the channels"):
        Downsample2D(4, use_conv=False, out_channels=8)
