"""pare.models.embeddings against diffusers.models.embeddings."""

import pytest
import torch
from diffusers.models import embeddings as theirs
from hypothesis import given
from hypothesis import strategies as st

from pare.models import embeddings as ours
from parity_tests.harness import check_block
from parity_tests.strategies import activations, embedding_dims, seeds, timestep_values


@given(dim=embedding_dims, flip=st.booleans(), shift=st.sampled_from([0, 1]), scale=st.sampled_from([1, 2]),
       t=timestep_values)
def test_timestep_features_match_diffusers(device, dim, flip, shift, scale, t):
    # The sinusoidal features are computed in float32 by both libraries whatever the model dtype.
    timesteps = torch.tensor(t, device=device)
    check_block(
        f"Timesteps(dim={dim})",
        ours.Timesteps(dim, flip, shift, scale),
        theirs.Timesteps(dim, flip, shift, scale),
        (timesteps,),
        device=device,
    )


@given(in_dim=embedding_dims, hidden=st.integers(1, 64), act=activations, post_act=st.none() | activations,
       out_dim=st.none() | st.integers(1, 32), cond=st.none() | st.integers(1, 16), seed=seeds,
       t=timestep_values)
def test_timestep_embedding_matches_diffusers(device, dtype, in_dim, hidden, act, post_act, out_dim, cond, seed, t):
    torch.manual_seed(seed)
    features = ours.get_timestep_embedding(torch.tensor(t), in_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    kwargs = {} if cond is None else {"condition": torch.randn(len(t), cond)}
    check_block(
        "TimestepEmbedding",
        ours.TimestepEmbedding(in_dim, hidden, act, out_dim, post_act, cond),
        theirs.TimestepEmbedding(in_dim, hidden, act, out_dim, post_act, cond),
        (features,),
        kwargs,
        dtype=dtype,
        device=device,
    )


def test_timestep_embedding_rejects_2d_timesteps():
    with pytest.raises(ValueError, match=r"1-d tensor .* shape \(2, 1\)"):
        ours.get_timestep_embedding(torch.zeros(2, 1), 8)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'tanhh'.*silu"):
        ours.TimestepEmbedding(4, 8, act_fn="tanhh")
