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
def unet_block_channels(draw, max_groups: int = 4, max_heads: int = 4):
    """(groups, in_channels, out_channels, heads) for a UNet block.

    GroupNorm needs both channel counts to be multiples of `groups`, and the transformer splits
    out_channels between `heads` (head dim = out_channels // heads, as in diffusers).
    """
    groups, heads = draw(st.integers(1, max_groups)), draw(st.integers(1, max_heads))
    in_channels = groups * draw(st.integers(1, 4))
    out_channels = groups * heads * draw(st.integers(1, 3))
    return groups, in_channels, out_channels, heads


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
