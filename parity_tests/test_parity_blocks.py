"""pare.parity.blocks: per-block comparison of two whole models, local and accumulated, naming the block that diverges."""

import copy

import pytest
import torch
from torch import nn

from pare.configs import UNET_CONFIGS
from pare.parity.blocks import block_names, compare_blocks, twin_call
from parity_tests.harness import cast
from parity_tests.test_unet import twins, unet_inputs


def test_block_names_are_the_stages_and_the_items_of_their_lists():
    ours, _ = twins("tiny-sdxl")
    names = block_names(ours)
    for expected in ("conv_in", "time_embedding", "add_embedding", "down_blocks.0", "down_blocks.0.resnets.0",
                     "down_blocks.0.downsamplers.0", "down_blocks.1.attentions.0",
                     "down_blocks.1.attentions.0.transformer_blocks.1", "mid_block", "mid_block.resnets.1",
                     "up_blocks.0.upsamplers.0", "conv_out"):
        assert expected in names, expected
    # containers and the layers inside a block are not blocks
    assert "down_blocks" not in names and "down_blocks.0.resnets.0.conv1" not in names
    assert not any(name.endswith("attn1") for name in names)


def test_depth_all_goes_down_to_the_layers_that_hold_the_code():
    ours, _ = twins("tiny-sd")
    names = block_names(ours, depth="all")
    tb = "down_blocks.0.attentions.0.transformer_blocks.0"
    for expected in ("down_blocks.0.resnets.0", "down_blocks.0.resnets.0.norm1", "down_blocks.0.resnets.0.conv1",
                     f"{tb}.attn1", f"{tb}.attn1.to_q", f"{tb}.ff", f"{tb}.ff.net.0", f"{tb}.norm3", "time_proj"):
        assert expected in names, expected
    # containers and torch's parameter-free layers carry no code of either library
    assert "down_blocks" not in names and f"{tb}.ff.net" not in names and f"{tb}.attn1.to_out" not in names
    blocks = block_names(ours)
    assert set(blocks) < set(names)
    assert not any(isinstance(ours.get_submodule(n), (nn.Dropout, nn.SiLU, nn.ModuleList)) for n in names if n not in blocks)
    with pytest.raises(ValueError, match="depth='leaves' is unknown; expected one of"):
        block_names(ours, depth="leaves")


def test_every_block_of_a_faithful_unet_passes_in_execution_order(device, dtype):
    ours, theirs = twins("tiny-sdxl")
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sdxl"], 2, 9, 7)  # odd sizes on purpose
    args, kwargs = cast(args, dtype, device), cast(kwargs, dtype, device)
    reference64 = copy.deepcopy(theirs).double() if dtype != torch.float32 else None
    result = compare_blocks(ours, theirs, args, kwargs, reference64=reference64)

    assert result.first_failure is None, str(result)
    assert all(row.accumulated is not None for row in result.rows)
    names = [row.name for row in result.rows]
    assert set(names) == set(block_names(ours)) | {"UNet2DConditionModel"}
    # a block finishes after the blocks inside it, and the whole model last
    assert names.index("down_blocks.1.attentions.0.transformer_blocks.1") < names.index("down_blocks.1.attentions.0")
    assert names.index("down_blocks.1.attentions.0") < names.index("down_blocks.1") < names.index("mid_block")
    assert names[-1] == "UNet2DConditionModel"


def test_float64_reference_fills_each_rows_error_budget():
    ours, theirs = twins("tiny-sd")
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sd"], 1, 8, 8)
    result = compare_blocks(ours, theirs, args, kwargs, names=["conv_in", "mid_block"],
                            reference64=copy.deepcopy(theirs).double())
    assert [row.name for row in result.rows] == ["conv_in", "mid_block", "UNet2DConditionModel"]
    for row in result.rows:
        for view in (row.local, row.accumulated):
            assert view.pare_err64 is not None and view.pare_err64 < 1e-5 and view.diffusers_err64 < 1e-5


@pytest.mark.parametrize("broken", ["down_blocks.0.attentions.0", "up_blocks.1.resnets.0", "mid_block.attentions.0"])
def test_first_failing_row_names_exactly_the_broken_block(broken):
    ours, theirs = twins("tiny-sd")
    module = ours.get_submodule(broken)
    forward = module.forward
    module.forward = lambda *args, **kwargs: forward(*args, **kwargs) * (1 + 1e-3)  # a 0.1% bug
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sd"], 2, 8, 8)
    result = compare_blocks(ours, theirs, args, kwargs)

    assert result.first_failure is not None and result.first_failure.name == broken, str(result)
    before = result.rows[:[row.name for row in result.rows].index(broken)]
    assert before and all(row.passed for row in before)
    assert f"first failure:\nlocal (same inputs on both sides): [FAIL] {broken}" in str(result)
    # Locally, only the broken block and the blocks around it fail: every other block, fed diffusers'
    # inputs, still computes what diffusers computes, even downstream of the bug.
    failing_locally = {row.name for row in result.rows if not row.local.passed}
    assert failing_locally == {n for n in failing_locally if broken.startswith(n) or n == "UNet2DConditionModel"}
    assert broken in failing_locally


def test_an_upstream_error_fails_the_accumulated_view_downstream_but_not_the_local_one():
    ours, theirs = twins("tiny-sd")
    ours.conv_in.register_forward_hook(lambda m, i, out: out * (1 + 1e-3))
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sd"], 2, 8, 8)
    result = compare_blocks(ours, theirs, args, kwargs)
    rows = {row.name: row for row in result.rows}
    assert result.first_failure.name == "conv_in"
    assert rows["mid_block"].local.passed and not rows["mid_block"].accumulated.passed
    assert not rows["mid_block"].passed and rows["mid_block"].reason.startswith("accumulated: ")


def test_a_drift_below_block_tolerance_in_every_block_is_seen_only_accumulated():
    # Each resnet off by 2e-6 (under the 1e-5 block limit): no block is wrong on its own; the
    # whole stack drifts, and only the accumulated view sees the drift grow.
    ours, theirs = twins("tiny-sd")
    for module in ours.modules():
        if type(module).__name__ == "ResnetBlock2D":
            module.register_forward_hook(lambda m, i, out: out * (1 + 2e-6))
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sd"], 2, 8, 8)
    result = compare_blocks(ours, theirs, args, kwargs)
    assert result.first_failure is None and all(row.local.rel_l2 < 1e-5 for row in result.rows), str(result)
    accumulated = [row.accumulated.rel_l2 for row in result.rows if ".resnets." in row.name]
    assert accumulated[-1] > accumulated[0]  # the drift grows with depth


class _Theirs(nn.Module):
    def forward(self, hidden_states, temb=None, cross_attention_kwargs=None, scale=1.0, return_dict=True, **kwargs):
        return hidden_states


class _Ours(nn.Module):
    def forward(self, hidden_states, temb=None):
        return hidden_states


def test_twin_call_passes_pares_arguments_and_drops_only_defaults():
    x = torch.ones(1)
    assert twin_call(_Ours(), _Theirs(), (x,), {"temb": x, "cross_attention_kwargs": {}, "return_dict": False,
                                              "scale": 1.0, "extra": None}) == {"hidden_states": x, "temb": x}
    with pytest.raises(ValueError, match=r"diffusers calls _Theirs with scale=0.5, which pare's _Ours.forward does not take"):
        twin_call(_Ours(), _Theirs(), (x,), {"scale": 0.5})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs=\{'scale': 0.5\}"):
        twin_call(_Ours(), _Theirs(), (x,), {"cross_attention_kwargs": {"scale": 0.5}})


def test_unknown_block_names_are_refused():
    ours, theirs = twins("tiny-sd")
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sd"], 1, 8, 8)
    with pytest.raises(ValueError, match=r"has no modules named \['down_blocks.7'\]"):
        compare_blocks(ours, theirs, args, kwargs, names=["down_blocks.7"])
