"""pare.AutoencoderKL against diffusers.AutoencoderKL: loading, encode, decode, sampling, slicing, tiling, fp16 safety.

CPU: tiny configs and the official SD config at 64^2. GPU tier (`official`, --device cuda): the SD
VAE at 512^2, the SDXL VAE at 1024^2, tiled at 1024^2 and 2048^2, in the --dtype precision.
"""

import copy
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pare import AutoencoderKL
from pare.configs import SD_VAE, SDXL_VAE, TINY_VAE
from pare.parity import assert_parity
from parity_tests.checkpoints import build_diffusers_model, make_checkpoint
from parity_tests.harness import cast, fast_if_asked
from parity_tests.strategies import seeds, vae_configs

HALF = (torch.float16, torch.bfloat16)

# The same operation through each library's API: (pare, diffusers).
ENCODE = (lambda m, x: m.encode(x).parameters, lambda m, x: m.encode(x).latent_dist.parameters)
DECODE = (lambda m, z: m.decode(z), lambda m, z: m.decode(z).sample)
FORWARD = (lambda m, x: m(x), lambda m, x: m(x).sample)


def pare_twin(theirs: torch.nn.Module, config: dict) -> AutoencoderKL:
    """pare's AutoencoderKL at `config` holding a copy of diffusers' weights, loaded strictly, on their device."""
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(config)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    return ours.eval()


def pair(config: dict, device, dtype=torch.float32, seed: int = 0):
    theirs = build_diffusers_model("vae", config, seed, device)
    return fast_if_asked(pare_twin(theirs, config).to(dtype)), theirs.to(dtype)


@torch.no_grad()
def check_vae(name, ours, theirs, op, *inputs, dtype, device, setup=None):
    """Run `op` through both models in `dtype`; below float32 also through diffusers in float64. Assert parity."""
    inputs = cast(inputs, dtype, device)
    ours_out, theirs_out = op[0](ours, *inputs), op[1](theirs, *inputs)
    reference = None
    if dtype in HALF:
        theirs64 = copy.deepcopy(theirs).double()
        reference = op[1](theirs64, *cast(inputs, torch.float64, device))
        del theirs64
    return assert_parity(name, ours_out, theirs_out, reference, dtype=dtype, scope="end_to_end")


def image(batch, side, width=None, seed=0, channels=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, side, width or side, generator=gen) * 2 - 1  # in [-1, 1], as pipelines feed


def latents(batch, side, width=None, seed=0, channels=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, side, width or side, generator=gen)


def set_tiles(models, sample: int, latent: int, overlap: float = 0.25):
    for m in models:
        m.enable_tiling()
        m.tile_sample_min_size, m.tile_latent_min_size, m.tile_overlap_factor = sample, latent, overlap


# -- loading ------------------------------------------------------------------------------------


def test_from_pretrained_loads_a_diffusers_checkpoint_exactly(device):
    folder = make_checkpoint("vae", TINY_VAE)
    ours = AutoencoderKL.from_pretrained(folder, device=device)
    theirs = build_diffusers_model("vae", TINY_VAE)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key].cpu(), value), key
    assert ours.config.scaling_factor == 0.18215 and ours.config.force_upcast is True
    assert ours.config.shift_factor is None and not ours.training


def test_fp16_variant_loads(device):
    folder = make_checkpoint("vae", TINY_VAE, variant="fp16")
    ours = AutoencoderKL.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16, device=device)
    theirs = build_diffusers_model("vae", TINY_VAE).half()
    assert ours.dtype == torch.float16
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key].cpu(), value), key


@pytest.mark.parametrize("config", [SD_VAE, SDXL_VAE], ids=["sd", "sdxl"])
def test_official_configs_have_diffusers_parameter_names_and_shapes(config):
    import diffusers

    with torch.device("meta"):
        ours = AutoencoderKL.from_config(config)
        theirs = diffusers.AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.config.scaling_factor == config["scaling_factor"]
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (
        theirs.tile_sample_min_size, theirs.tile_latent_min_size, theirs.tile_overlap_factor)


def test_every_diffusers_config_key_is_accepted_with_diffusers_defaults():
    import inspect

    import diffusers

    theirs = {k: p.default for k, p in inspect.signature(diffusers.AutoencoderKL.__init__).parameters.items()
              if k != "self"}
    ours = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items() if k != "self"}
    assert ours == theirs


def test_unknown_block_type_is_refused_naming_the_supported_ones():
    # The config check (pare/validation.py) names the key, the entry and the supported types.
    with pytest.raises(ValueError, match=r"down_block_types=.*entry \[0\] = 'AttnDownEncoderBlock2D'.*"
                                         r"each entry one of \('DownEncoderBlock2D',\)"):
        AutoencoderKL.from_config({**TINY_VAE, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]})
    with pytest.raises(ValueError, match=r"up_block_types=.*'AttnUpDecoderBlock2D'"):
        AutoencoderKL.from_config({**TINY_VAE, "up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]})


# -- encode and decode end to end ---------------------------------------------------------------


@pytest.mark.parametrize("op, name", [(ENCODE, "encode"), (DECODE, "decode"), (FORWARD, "forward")])
def test_tiny_vae_matches_diffusers(device, dtype, op, name):
    ours, theirs = pair(TINY_VAE, device, dtype)
    x = latents(2, 8, 6) if name == "decode" else image(2, 16, 12)
    check_vae(f"tiny VAE {name}", ours, theirs, op, x, dtype=dtype, device=device)


@given(config=vae_configs(), side=st.integers(1, 3), seed=seeds)
def test_any_small_vae_config_matches_diffusers(device, dtype, config, side, seed):
    ours, theirs = pair(config, device, dtype, seed)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    x = image(2, 2 * side * f, channels=config["in_channels"], seed=seed)
    check_vae("encode", ours, theirs, ENCODE, x, dtype=dtype, device=device)
    z = latents(2, side + 1, side, channels=config["latent_channels"], seed=seed)
    check_vae("decode", ours, theirs, DECODE, z, dtype=dtype, device=device)


def test_sd_vae_at_64px_matches_diffusers(device, dtype):
    # The official SD config (84M parameters) at a size the CPU runs in seconds.
    ours, theirs = pair(SD_VAE, device, dtype)
    check_vae("SD VAE encode 64^2", ours, theirs, ENCODE, image(1, 64), dtype=dtype, device=device)
    check_vae("SD VAE decode 8^2 -> 64^2", ours, theirs, DECODE, latents(1, 8), dtype=dtype, device=device)


def test_sampled_latents_equal_diffusers_under_the_same_generator(device, dtype):
    ours, theirs = pair(TINY_VAE, device, dtype)
    op = (lambda m, x: m.encode(x).sample(torch.Generator().manual_seed(3)),
          lambda m, x: m.encode(x).latent_dist.sample(torch.Generator().manual_seed(3)))
    check_vae("encode -> sample(generator)", ours, theirs, op, image(2, 16), dtype=dtype, device=device)
    # ... and through forward(sample_posterior=True)
    op = (lambda m, x: m(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)),
          lambda m, x: m(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)
    check_vae("forward(sample_posterior)", ours, theirs, op, image(2, 16), dtype=dtype, device=device)


def test_mean_std_var_mode_kl_match_diffusers(device):
    ours, theirs = pair(TINY_VAE, device)
    x = image(2, 16).to(device)
    with torch.no_grad():
        mine, their = ours.encode(x), theirs.encode(x).latent_dist
    for name in ("mean", "std", "var", "logvar"):
        assert_parity(name, getattr(mine, name), getattr(their, name), scope="end_to_end")
    assert_parity("mode", mine.mode(), their.mode(), scope="end_to_end")
    assert_parity("kl", mine.kl(), their.kl(), scope="end_to_end")


@pytest.mark.parametrize("option", ["use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"])
def test_config_options_match_diffusers(device, dtype, option):
    config = {**TINY_VAE, option: False}
    ours, theirs = pair(config, device, dtype)
    dropped = {"use_quant_conv": [ours.quant_conv], "use_post_quant_conv": [ours.post_quant_conv],
               "mid_block_add_attention": [*ours.encoder.mid_block.attentions, *ours.decoder.mid_block.attentions]}
    assert all(module is None for module in dropped[option])
    check_vae(f"{option}=False", ours, theirs, FORWARD, image(1, 16), dtype=dtype, device=device)


# -- slicing and tiling -------------------------------------------------------------------------


def test_slicing_matches_diffusers_slicing(device, dtype):
    ours, theirs = pair(TINY_VAE, device, dtype)
    for m in (ours, theirs):
        m.enable_slicing()
    check_vae("sliced encode", ours, theirs, ENCODE, image(3, 16), dtype=dtype, device=device)
    check_vae("sliced decode", ours, theirs, DECODE, latents(3, 8), dtype=dtype, device=device)
    ours.disable_slicing()  # slicing only saves memory: the batched result is the same
    check_vae("batched vs diffusers sliced", ours, theirs, DECODE, latents(3, 8), dtype=dtype, device=device)


# (tile_sample_min_size, tile_latent_min_size, overlap, image height, image width): the tiny VAE downsamples by 2.
TILINGS = [(16, 8, 0.25, 40, 32), (16, 8, 0.5, 24, 40), (12, 6, 0.25, 30, 20), (32, 16, 0.25, 33, 64)]


@pytest.mark.parametrize("tiles", TILINGS, ids=lambda t: "x".join(map(str, t)))
def test_tiled_encode_and_decode_match_diffusers_tiled(device, dtype, tiles):
    sample, latent, overlap, h, w = tiles
    ours, theirs = pair(TINY_VAE, device, dtype)
    set_tiles((ours, theirs), sample, latent, overlap)
    check_vae(f"tiled encode {h}x{w}", ours, theirs, ENCODE, image(1, h, w), dtype=dtype, device=device)
    check_vae(f"tiled decode {h // 2}x{w // 2}", ours, theirs, DECODE, latents(1, h // 2, w // 2), dtype=dtype,
              device=device)


@given(latent=st.integers(2, 8), overlap=st.sampled_from([0.125, 0.25, 0.5]), h=st.integers(1, 20),
       w=st.integers(1, 20), seed=seeds)
def test_tiled_decode_matches_diffusers_for_any_tile_grid(device, dtype, latent, overlap, h, w, seed):
    ours, theirs = pair(TINY_VAE, device, dtype)
    set_tiles((ours, theirs), 2 * latent, latent, overlap)
    check_vae(f"tiled decode {h}x{w}", ours, theirs, DECODE, latents(1, h, w, seed=seed), dtype=dtype, device=device)


def test_tiling_changes_nothing_below_the_tile_size(device):
    ours, _ = pair(TINY_VAE, device)
    z = latents(1, 16).to(device)
    with torch.no_grad():
        plain = ours.decode(z)
        ours.enable_tiling()
        assert torch.equal(ours.decode(z), plain)  # 16 latents = tile_latent_min_size: no tiling
        ours.tile_latent_min_size, ours.tile_sample_min_size = 8, 16
        assert not torch.equal(ours.decode(z), plain)


# -- input validation ---------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_a_reason():
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(B, 4, H, W\), got \(4, 8, 8\): add a batch"):
        vae.decode(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\), got \(1, 4, 8, 8\)"):
        vae.encode(torch.randn(1, 4, 8, 8))
    z = torch.randn(1, 4, 8, 8)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 256 latents values are NaN or inf"):
        vae.decode(z)
    with pytest.raises(TypeError, match="the latents are torch.float16 but the VAE is torch.float32"):
        vae.decode(torch.randn(1, 4, 8, 8).half())


def test_encode_and_decode_trace_whole_for_compile_and_cuda_graphs(device):
    """The NaN check reads a count back to the host, which a CUDA graph capture or a full-graph compile
    cannot do: there it is skipped (and only there; eager calls keep it, see the test above)."""
    ours, theirs = pair(TINY_VAE, device)
    z, x = torch.randn(1, 4, 8, 8, device=device), image(1, 16).to(device)
    with torch.no_grad():
        for op, inp in ((DECODE, z), (ENCODE, x)):
            torch._dynamo.reset()
            traced = torch.compile(op[0], backend="eager", fullgraph=True)  # fullgraph: any host read raises
            assert_parity("compiled (dynamo, eager backend)", traced(ours, inp), op[1](theirs, inp), scope="end_to_end")
            if device.type == "cuda":
                replay = capture(lambda: op[0](ours, inp), device)
                assert_parity("replayed CUDA graph", replay(), op[1](theirs, inp), scope="end_to_end")
    torch._dynamo.reset()


def capture(fn, device):
    """`fn` captured in a CUDA graph (after warm-up on a side stream); returns a replay giving its output."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out.clone()

    return replay


# -- half precision: force_upcast and non-finite outputs ----------------------------------------


def overflowing_vae(config: dict) -> AutoencoderKL:
    """A tiny VAE whose decoder output exceeds float16's range (65504) but not float32's: SDXL's failure in small."""
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e5)
    return vae


def float32_copy(vae: AutoencoderKL) -> AutoencoderKL:
    """A separate float32 model with the same (upcast) weights."""
    copy_ = AutoencoderKL.from_config(vae.config).eval()
    copy_.load_state_dict({k: v.float() for k, v in vae.state_dict().items()}, strict=True)
    return copy_


def test_decode_in_fp16_overflows_where_float32_does_not():
    vae = overflowing_vae(TINY_VAE)
    z = latents(1, 8)
    with torch.no_grad():
        assert torch.isfinite(vae.decode(z)).all()
        assert not torch.isfinite(vae.half().decode(z.half())).all()


def test_decode_safely_follows_force_upcast_like_diffusers():
    # force_upcast and float16: decode in float32, as diffusers' SDXL pipeline does (vae.to(float32), decode, back).
    vae = overflowing_vae(TINY_VAE).half()
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    z = latents(1, 8).half()
    assert vae.needs_upcast
    with torch.no_grad():
        image_ = vae.decode_safely(z)
        expected = float32_copy(vae).decode(z.float())
    assert image_.dtype == torch.float32 and torch.equal(image_, expected)
    assert vae.dtype == torch.float16  # restored, bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())


def test_decode_safely_retries_an_overflow_in_float32_when_force_upcast_is_off(caplog):
    vae = overflowing_vae({**TINY_VAE, "force_upcast": False}).half()
    assert not vae.needs_upcast
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="pare"):
        image_ = vae.decode_safely(latents(1, 8).half())
    assert image_.dtype == torch.float32 and torch.isfinite(image_).all()
    assert "gave NaN or inf (force_upcast=False); running it again in float32" in caplog.text


def test_decode_safely_stays_in_half_precision_when_it_is_finite(caplog):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**TINY_VAE, "force_upcast": False}).eval().half()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="pare"):
        image_ = vae.decode_safely(latents(1, 8))  # float32 latents are cast to the VAE's dtype
        assert image_.dtype == torch.float16 and torch.equal(image_, vae.decode(latents(1, 8).half()))
        # bf16 does not overflow where fp32 does not (same exponent range): force_upcast leaves it alone ...
        vae.to(torch.bfloat16)
        assert vae.decode_safely(latents(1, 8)).dtype == torch.bfloat16
        # ... unless asked.
        assert vae.decode_safely(latents(1, 8), upcast=True).dtype == torch.float32
    assert caplog.text == ""


def test_encode_safely_upcasts_like_decode_safely():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(TINY_VAE).eval().half()
    with torch.no_grad():
        posterior = vae.encode_safely(image(1, 16))
        expected = float32_copy(vae).encode(image(1, 16))
    assert posterior.mean.dtype == torch.float32 and torch.equal(posterior.parameters, expected.parameters)


def test_non_finite_float32_output_is_an_error_not_an_image():
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match="decode gave NaN or inf in torch.float32 from finite inputs"):
            vae.decode_safely(latents(1, 8))


@pytest.mark.parametrize("mean_std", [False, True])
@pytest.mark.parametrize("shift", [None, 0.1159])
def test_scale_latents_is_what_diffusers_pipelines_do(shift, mean_std):
    config = {**TINY_VAE, "shift_factor": shift, "scaling_factor": 0.3611}
    if mean_std:
        config |= {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.5, 1.0, 2.0]}
    vae = AutoencoderKL.from_config(config)
    z = latents(2, 4)
    if mean_std:  # pipeline_stable_diffusion_xl.py
        mean, std = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1), torch.tensor(config["latents_std"]).view(1, 4, 1, 1)
        expected_scaled = (z - mean) * config["scaling_factor"] / std
        expected_unscaled = z * std / config["scaling_factor"] + mean
    else:  # pipeline_stable_diffusion.py, and with a shift pipeline_stable_diffusion_3.py
        expected_scaled = (z - (shift or 0.0)) * config["scaling_factor"]
        expected_unscaled = z / config["scaling_factor"] + (shift or 0.0)
    torch.testing.assert_close(vae.scale_latents(z), expected_scaled)
    torch.testing.assert_close(vae.unscale_latents(z), expected_unscaled)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


# -- GPU tier: official configs at the sizes pipelines use ----------------------------------------


@pytest.mark.official
def test_sd_vae_at_512px_matches_diffusers(device, dtype):
    ours, theirs = pair(SD_VAE, device, dtype)
    check_vae("SD VAE encode 512^2", ours, theirs, ENCODE, image(1, 512), dtype=dtype, device=device)
    check_vae("SD VAE decode 64^2 -> 512^2", ours, theirs, DECODE, latents(1, 64), dtype=dtype, device=device)


@pytest.mark.official
def test_sdxl_vae_at_1024px_matches_diffusers(device, dtype):
    ours, theirs = pair(SDXL_VAE, device, dtype)
    check_vae("SDXL VAE encode 1024^2", ours, theirs, ENCODE, image(1, 1024), dtype=dtype, device=device)
    check_vae("SDXL VAE decode 128^2 -> 1024^2", ours, theirs, DECODE, latents(1, 128), dtype=dtype, device=device)


@pytest.mark.official
def test_sd_vae_tiled_at_1024px_matches_diffusers_tiled(device, dtype):
    # Default tiles: 512 pixels / 64 latents, a quarter overlap; 1024^2 makes a 3 x 3 grid.
    ours, theirs = pair(SD_VAE, device, dtype)
    for m in (ours, theirs):
        m.enable_tiling()
    check_vae("SD VAE tiled encode 1024^2", ours, theirs, ENCODE, image(1, 1024), dtype=dtype, device=device)
    check_vae("SD VAE tiled decode 128^2 -> 1024^2", ours, theirs, DECODE, latents(1, 128), dtype=dtype, device=device)


@pytest.mark.official
def test_sdxl_vae_tiled_decode_at_2048px_matches_diffusers_tiled(device, dtype):
    ours, theirs = pair(SDXL_VAE, device, dtype)
    for m in (ours, theirs):
        m.enable_tiling()
    check_vae("SDXL VAE tiled decode 256^2 -> 2048^2", ours, theirs, DECODE, latents(1, 256), dtype=dtype,
              device=device)


@pytest.mark.official
def test_sdxl_decode_safely_matches_diffusers_upcast_decode(device):
    # What diffusers' SDXL pipeline does with a float16 VAE and force_upcast: vae.to(float32), decode, vae.to(float16).
    ours, theirs = pair(SDXL_VAE, device, torch.float16)
    z = latents(1, 128).to(device, torch.float16)
    with torch.no_grad():
        image_ = ours.decode_safely(z)
        theirs.to(torch.float32)
        expected = theirs.decode(z.float()).sample
    assert ours.dtype == torch.float16 and image_.dtype == torch.float32
    assert_parity("SDXL decode_safely vs diffusers upcast", image_, expected, dtype=torch.float32, scope="end_to_end")
