"""pare.models.vae (Encoder, Decoder, DiagonalGaussianDistribution) against diffusers.models.autoencoders.vae."""

import pytest
import torch
from diffusers.models.autoencoders.vae import Decoder as TheirDecoder
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as TheirGaussian
from diffusers.models.autoencoders.vae import Encoder as TheirEncoder
from diffusers.utils.torch_utils import randn_tensor
from hypothesis import given
from hypothesis import strategies as st

from pare.models.vae import Decoder, DiagonalGaussianDistribution, Encoder, randn_like_diffusers
from pare.parity import assert_parity
from parity_tests.harness import check_block
from parity_tests.strategies import batch_sizes, seeds, vae_configs
from parity_tests.test_vae_blocks import randomise

ENCODER_KEYS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
                "act_fn", "mid_block_add_attention")
DECODER_KEYS = ("out_channels", "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
                "act_fn", "mid_block_add_attention")


@given(config=vae_configs(), double_z=st.booleans(), side=st.integers(2, 5), batch=batch_sizes, seed=seeds)
def test_encoder_matches_diffusers(device, dtype, config, double_z, side, batch, seed):
    kw = {k: config[k] for k in ENCODER_KEYS} | {"out_channels": config["latent_channels"], "double_z": double_z}
    f = 2 ** (len(config["block_out_channels"]) - 1)
    torch.manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], side * f, (side + 1) * f - 1)  # an odd width too
    check_block(f"Encoder({config['block_out_channels']})", Encoder(**kw), randomise(TheirEncoder(**kw)), (x,),
                dtype=dtype, device=device)


@given(config=vae_configs(), side=st.integers(1, 5), batch=batch_sizes, seed=seeds)
def test_decoder_matches_diffusers(device, dtype, config, side, batch, seed):
    kw = {k: config[k] for k in DECODER_KEYS} | {"in_channels": config["latent_channels"]}
    torch.manual_seed(seed)
    z = torch.randn(batch, config["latent_channels"], side + 1, side)
    check_block(f"Decoder({config['block_out_channels']})", Decoder(**kw), randomise(TheirDecoder(**kw)), (z,),
                dtype=dtype, device=device)


@pytest.mark.parametrize("cls, arg", [(Encoder, "down_block_types"), (Decoder, "up_block_types")])
def test_unknown_block_type_names_the_supported_ones(cls, arg):
    with pytest.raises(ValueError, match=r"unknown \w+_block_type 'AttnDownEncoderBlock2D'; pare's VAE supports \('"):
        cls(**{arg: ["AttnDownEncoderBlock2D"]}, block_out_channels=[8], norm_num_groups=2)
    with pytest.raises(ValueError, match="must have the same length"):
        cls(block_out_channels=[8, 8], norm_num_groups=2)


def moments(batch=2, channels=4, h=5, w=3, seed=0) -> torch.Tensor:
    """Encoder-like moments whose log-variance also reaches past the clamp at -30 and 20."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, 2 * channels, h, w, generator=gen)
    m[:, channels:] *= 15
    return m


def test_gaussian_statistics_equal_diffusers(device, dtype):
    params = moments().to(device=device, dtype=dtype)
    ours, theirs = DiagonalGaussianDistribution(params), TheirGaussian(params)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name  # same elementwise ops: bit-equal
    assert torch.equal(ours.mode(), theirs.mode())
    if dtype == torch.float32:  # a sum over every latent: fp16 overflows it (on both sides)
        assert_parity("kl", ours.kl(), theirs.kl(), dtype=dtype)
        other = moments(seed=1).to(device=device, dtype=dtype)
        assert_parity("kl(other)", ours.kl(DiagonalGaussianDistribution(other)), theirs.kl(TheirGaussian(other)),
                      dtype=dtype)
        x = torch.randn(ours.mean.shape, device=device, dtype=dtype)
        assert_parity("nll", ours.nll(x), theirs.nll(x), dtype=dtype)


@given(seed=seeds, batch=st.integers(1, 3), as_list=st.booleans())
def test_sample_with_same_generator_equals_diffusers(device, dtype, seed, batch, as_list):
    params = moments(batch=batch, seed=seed).to(device=device, dtype=dtype)

    def generators():
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        return gens if as_list else gens[0]

    ours = DiagonalGaussianDistribution(params).sample(generators())
    theirs = TheirGaussian(params).sample(generators())
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("gen_device", ["cpu", "same"])
def test_noise_is_drawn_where_diffusers_draws_it(device, dtype, gen_device):
    gen_device = device if gen_device == "same" else torch.device(gen_device)
    ours = randn_like_diffusers((2, 4, 3, 3), torch.Generator(gen_device).manual_seed(7), device, dtype)
    theirs = randn_tensor((2, 4, 3, 3), generator=torch.Generator(gen_device).manual_seed(7), device=device,
                          dtype=dtype)
    assert ours.device == theirs.device and torch.equal(ours, theirs)


def test_deterministic_gaussian_is_its_mean():
    dist = DiagonalGaussianDistribution(moments(), deterministic=True)
    assert torch.equal(dist.sample(torch.Generator().manual_seed(0)), dist.mean)
    assert torch.equal(dist.kl(), torch.zeros(2))


def test_wrong_generator_count_is_an_error():
    with pytest.raises(ValueError, match="got 3 generators for a batch of 2"):
        DiagonalGaussianDistribution(moments()).sample([torch.Generator() for _ in range(3)])
