"""hypothesis strategies for the shapes and configs users pick, written once and reused."""

from hypothesis import strategies as st

activations = st.sampled_from(["silu", "gelu", "mish", "relu"])
timestep_values = st.lists(st.floats(0, 999, allow_nan=False), min_size=1, max_size=4)
embedding_dims = st.integers(2, 96)
batch_sizes = st.integers(1, 3)
seeds = st.integers(0, 2**16)


@st.composite
def group_norm_channels(draw, max_groups: int = 4, max_per_group: int = 8):
    """(groups, channels) with channels a multiple of groups, as GroupNorm requires."""
    groups = draw(st.integers(1, max_groups))
    return groups, groups * draw(st.integers(1, max_per_group))


@st.composite
def feature_maps(draw, channels: int, max_side: int = 12, odd: bool = True, min_side: int = 1):
    """(batch, channels, height, width) with odd sides too where the block allows them.

    Blocks that GroupNorm their input need min_side=2: a group of one value has no variance.
    """
    side = st.integers(max(min_side, 1 if odd else 2), max_side)
    h, w = draw(side), draw(side)
    if not odd:
        h, w = h - h % 2, w - w % 2
    return draw(batch_sizes), channels, h, w


@st.composite
def vae_configs(draw, max_stages: int = 3):
    """A small AutoencoderKL config: 1 to `max_stages` stages, channels a multiple of the groups, every option drawn.

    The image side must be a multiple of 2 ** (stages - 1) times at least 2 for the encoder's
    last stage to have a GroupNorm with more than one value per group.
    """
    groups = draw(st.integers(1, 4))
    stages = draw(st.integers(1, max_stages))
    return {
        "block_out_channels": [groups * draw(st.integers(1, 4)) for _ in range(stages)],
        "down_block_types": ["DownEncoderBlock2D"] * stages,
        "up_block_types": ["UpDecoderBlock2D"] * stages,
        "norm_num_groups": groups,
        "layers_per_block": draw(st.integers(1, 2)),
        "in_channels": draw(st.integers(1, 4)),
        "out_channels": draw(st.integers(1, 4)),
        "latent_channels": draw(st.integers(1, 4)),
        "act_fn": draw(activations),
        "mid_block_add_attention": draw(st.booleans()),
        "use_quant_conv": draw(st.booleans()),
        "use_post_quant_conv": draw(st.booleans()),
    }


# --- schedulers ---------------------------------------------------------------------------------

SCHEDULER_KINDS = ("ddim", "ddpm")
train_timesteps = st.one_of(st.just(1000), st.integers(2, 1000))
scheduler_dtypes = st.sampled_from(["fp32", "fp64", "fp16", "bf16"])


@st.composite
def scheduler_configs(draw, kind: str, num_train_timesteps=train_timesteps):
    """A diffusers config dict for DDIMScheduler ("ddim") or DDPMScheduler ("ddpm") with every option in play.

    Values stay where real configs live (betas ~1e-4 .. 3e-2); options are drawn independently,
    including combinations no checkpoint uses (thresholding with clip_sample, say).
    """
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {SCHEDULER_KINDS}")
    T = draw(num_train_timesteps)
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["sigmoid", "laplace"] if kind == "ddpm" else [])
    config = dict(
        num_train_timesteps=T,
        beta_start=draw(st.floats(1e-5, 2e-3)),
        beta_end=draw(st.floats(5e-3, 3e-2)),
        beta_schedule=draw(st.sampled_from(schedules)),
        trained_betas=None,
        clip_sample=draw(st.booleans()),
        clip_sample_range=draw(st.floats(0.5, 3.0)),
        prediction_type=draw(st.sampled_from(["epsilon", "v_prediction", "sample"])),
        thresholding=draw(st.booleans()),
        dynamic_thresholding_ratio=draw(st.floats(0.8, 1.0)),
        sample_max_value=draw(st.floats(1.0, 3.0)),
        timestep_spacing=draw(st.sampled_from(["leading", "trailing", "linspace"])),
        steps_offset=draw(st.sampled_from([0, 0, 1, 2])),
        rescale_betas_zero_snr=draw(st.booleans()),
    )
    if draw(st.integers(0, 4)) == 0:  # now and then a checkpoint's own betas
        low, high = draw(st.floats(1e-5, 1e-3)), draw(st.floats(5e-3, 3e-2))
        config["trained_betas"] = [low + (high - low) * (i / max(T - 1, 1)) ** 2 for i in range(T)]
    if kind == "ddim":
        config["set_alpha_to_one"] = draw(st.booleans())
    else:
        config["variance_type"] = draw(st.sampled_from(
            ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]))
    return config


@st.composite
def scheduler_setups(draw, kind: str, num_train_timesteps=train_timesteps):
    """(config, num_inference_steps) with num_inference_steps anywhere in 1 .. num_train_timesteps."""
    config = draw(scheduler_configs(kind, num_train_timesteps))
    return config, draw(st.integers(1, config["num_train_timesteps"]))


@st.composite
def unet_block_channels(draw, max_groups: int = 4, max_heads: int = 4):
    """(groups, in_channels, out_channels, heads) for a UNet block.

    GroupNorm needs both channel counts to be multiples of `groups`, and the transformer splits
    out_channels between `heads` (head dim = out_channels // heads, as in diffusers).
    """
    groups, heads = draw(st.integers(1, max_groups)), draw(st.integers(1, max_heads))
    in_channels = groups * draw(st.integers(1, 4))
    out_channels = groups * heads * draw(st.integers(1, 3))
    return groups, in_channels, out_channels, heads
