"""pare.parity.blocks: per-block comparison of two whole models, and naming the first block that diverges."""

import copy

import pytest
import torch

from pare.configs import UNET_CONFIGS
from pare.parity.blocks import block_names, compare_blocks
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


def test_every_block_of_a_faithful_unet_passes_in_execution_order(device, dtype):
    ours, theirs = twins("tiny-sdxl")
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sdxl"], 2, 9, 7)  # odd sizes on purpose
    args, kwargs = cast(args, dtype, device), cast(kwargs, dtype, device)
    reference64 = copy.deepcopy(theirs).double() if dtype != torch.float32 else None
    result = compare_blocks(ours, theirs, args, kwargs, reference64=reference64)

    assert result.first_failure is None, str(result)
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
    assert all(row.pare_err64 is not None and row.pare_err64 < 1e-5 for row in result.rows)


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
    assert f"first failure:\n[FAIL] {broken}" in str(result)


def test_unknown_block_names_are_refused():
    ours, theirs = twins("tiny-sd")
    args, kwargs = unet_inputs(UNET_CONFIGS["tiny-sd"], 1, 8, 8)
    with pytest.raises(ValueError, match=r"has no modules named \['down_blocks.7'\]"):
        compare_blocks(ours, theirs, args, kwargs, names=["down_blocks.7"])
