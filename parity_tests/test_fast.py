"""pare.fast: the fast path computes the reference's function on the reference's weights.

On the CPU (and wherever Triton is missing) the fast blocks run their PyTorch twins, so these
tests check the structure: fused weights, channels last, the swaps and their undoing, LoRA
hooks, weights replaced after optimize. The Triton kernels are the kernel tier: each kernel against
its reference on fresh random inputs, judged like the parity suite (no further from float64 than
PyTorch's own op), on the GPU (`--device cuda`) or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1 pytest -m kernel`). The CUDA graphs are the GPU tier: the graphed UNet, text
encoders and VAE against eager, and the whole loop from one graph against the stepping loop (its logic also
on the CPU, with the graphs stood in for).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import pare.fast
import pare.fast.denoise
import pare.fast.unet
from pare.configs import TINY_SD_UNET, TINY_SDXL_UNET, TINY_VAE
from pare.fast.kernels import attention as attention_kernel
from pare.fast.kernels import concat as concat_kernel
from pare.fast.kernels import geglu as geglu_kernel
from pare.fast.kernels import group_norm as gn_kernel
from pare.fast.kernels import layer_norm as ln_kernel
from pare.fast.kernels import pixel_shuffle as shuffle_kernel
from pare.fast.kernels import timestep as timestep_kernel
from pare.fast.kernels import INTERPRET, triton_available
from pare.models.attention import Attention
from pare.fast import resampling as fast_resampling
from pare.models.autoencoder_kl import AutoencoderKL
from pare.models.resampling import Upsample2D
from pare.models.unet_2d_condition import UNet2DConditionModel
from pare.parity import assert_parity
from pare.parity.blocks import compare_blocks
from parity_tests.checkpoints import build_diffusers_model
from parity_tests.test_unet import unet_inputs

CONFIGS = {"tiny-sd": TINY_SD_UNET, "tiny-sdxl": TINY_SDXL_UNET}


def unet_pair(config: dict, device="cpu", dtype=torch.float32):
    theirs = build_diffusers_model("unet", config, device=device, dtype=dtype).eval()
    with torch.device(device):
        ours = UNet2DConditionModel.from_config(config).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_unet_matches_diffusers_block_by_block_fp32(name, monkeypatch):
    monkeypatch.setattr(fast_resampling, "PHASE_MIN_PIXELS", 0)  # the tiny maps' upsamplers too: sub-pixel convs
    ours, theirs = unet_pair(CONFIGS[name])
    pare.fast.optimize(ours)
    args, kwargs = unet_inputs(CONFIGS[name], 2, 8, 8)
    blocks = compare_blocks(ours, theirs, args, kwargs)
    assert blocks.first_failure is None, str(blocks)
    assert_parity(f"{name} fast UNet", ours(*args, **kwargs), theirs(*args, **kwargs).sample, scope="end_to_end")


@torch.no_grad()
def test_optimize_swaps_blocks_keeps_the_state_dict_and_restore_undoes_it():
    ours, _ = unet_pair(TINY_SD_UNET)
    reference = copy.deepcopy(ours)
    args, kwargs = unet_inputs(TINY_SD_UNET, 2, 8, 8)
    expected = reference(*args, **kwargs)
    pare.fast.optimize(ours)
    kinds = {type(m).__name__ for m in ours.modules()}
    assert {"FastResnetBlock2D", "FastAttention", "FastGEGLU", "FastTransformer2DModel", "FastBasicTransformerBlock",
            "FastGroupNorm", "FastUpsample2D", "FastUpBlock2D", "FastCrossAttnUpBlock2D", "FastTimesteps"} <= kinds
    assert not kinds & {"ResnetBlock2D", "Attention", "Upsample2D", "UpBlock2D", "CrossAttnUpBlock2D"}
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert ours(*args, **kwargs).is_contiguous(memory_format=torch.channels_last)  # channels last end to end
    sd, ref_sd = ours.state_dict(), reference.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    # a self-attention's Q, K, V weights are views of one fused matrix
    attn = next(m for m in ours.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    fused = attn._fused[0]
    assert attn.to_k.weight.data_ptr() == fused[attn.to_q.out_features].data_ptr()
    # every ResNet's time-embedding projection is a view of one stacked matrix, computed once per call
    resnets = [m for m in ours.modules() if type(m).__name__ == "FastResnetBlock2D"]
    bank = resnets[0]._time_projections
    assert len(resnets) > 2 and all(r._time_projections is bank for r in resnets)
    a, _ = bank.slices[id(resnets[-1].time_emb_proj)]
    assert resnets[-1].time_emb_proj.weight.data_ptr() == bank.weight[a].data_ptr()
    before = ours(*args, **kwargs)
    swapped = copy.deepcopy(resnets[0].time_emb_proj)  # a projection swapped in after optimize: it is used
    swapped.weight.data.mul_(2.0)
    resnets[0].time_emb_proj, kept = swapped, resnets[0].time_emb_proj
    assert (ours(*args, **kwargs) - before).abs().max() > 1e-3
    resnets[0].time_emb_proj = kept
    assert torch.equal(ours(*args, **kwargs), before)
    pare.fast.restore(ours)
    assert not any("Fast" in type(m).__name__ for m in ours.modules())
    assert torch.equal(ours(*args, **kwargs), expected)  # the reference forward again, bit for bit


@torch.no_grad()
def test_weights_loaded_after_optimize_are_used():
    """load_state_dict writes into the parameters, which the fused matrices back: the fast path sees new weights."""
    ours, _ = unet_pair(TINY_SD_UNET)
    pare.fast.optimize(ours)
    other = build_diffusers_model("unet", TINY_SD_UNET, seed=5)
    ours.load_state_dict(other.state_dict(), strict=True)
    args, kwargs = unet_inputs(TINY_SD_UNET, 2, 8, 8)
    assert_parity("fast UNet after load_state_dict", ours(*args, **kwargs), other(*args, **kwargs).sample,
                  scope="end_to_end")


@torch.no_grad()
def test_a_dtype_change_after_optimize_refuses_stale_fused_weights():
    """.to(float64) replaces the parameters: the fused matrices would be stale, so they are rebuilt, not used."""
    ours, theirs = unet_pair(TINY_SD_UNET)
    pare.fast.optimize(ours)
    ours.double()
    theirs.double()
    args, kwargs = unet_inputs(TINY_SD_UNET, 2, 8, 8)
    args, kwargs = [a.double() if a.is_floating_point() else a for a in args], kwargs
    out = ours(*args, **kwargs)
    assert out.dtype == torch.float64
    assert_parity("fast UNet after .double()", out, theirs(*args, **kwargs).sample, dtype=torch.float64,
                  scope="end_to_end")


@torch.no_grad()
def test_lora_hooks_on_projections_are_honoured():
    """A LoRA forward hook on to_q (pare/lora/layers.py) belongs to the module's own call: the fused path steps aside."""
    ours, _ = unet_pair(TINY_SD_UNET)
    reference = copy.deepcopy(ours)
    pare.fast.optimize(ours)
    args, kwargs = unet_inputs(TINY_SD_UNET, 2, 8, 8)
    before = ours(*args, **kwargs)

    def add_one(module, inputs, output):
        return output + 1.0

    for model in (ours, reference):
        attn = next(m for m in model.modules() if isinstance(m, Attention))
        attn.to_q.register_forward_hook(add_one)
    after = ours(*args, **kwargs)
    assert (after - before).abs().max() > 1e-3  # the hook changed the output
    assert_parity("fast UNet with a hook on to_q", after, reference(*args, **kwargs), scope="end_to_end")


@torch.no_grad()
def test_transformer_block_fuses_its_residual_adds_and_honours_hooks():
    """The fused block (each residual add done by the next norm's kernel) is the reference block's function;
    a LoRA hook on a projection still fires; a hook on a norm sends the block back to the reference."""
    from pare.fast.transformer import FastBasicTransformerBlock
    from pare.models.transformer import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 4, 16, cross_attention_dim=32).eval()
    for p in block.parameters():  # non-trivial norms and biases, so that a dropped or doubled term shows
        p.data += 0.1 * torch.randn_like(p)
    reference = copy.deepcopy(block)
    pare.fast.optimize_model(block)
    assert type(block) is FastBasicTransformerBlock and block._fusable()
    x, text = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    mask = torch.zeros(2, 1, 7).masked_fill(torch.arange(7) >= 5, float("-inf"))
    x_before = x.clone()
    ours = block(x, text, encoder_attention_mask=mask)
    assert torch.equal(x, x_before)  # the input is not written
    torch.testing.assert_close(ours, reference(x, text, encoder_attention_mask=mask), rtol=1e-5, atol=1e-5)

    def add_one(module, inputs, output):
        return output + 1.0

    for b in (block, reference):
        b.attn2.to_out[0].register_forward_hook(add_one)
    assert block._fusable()  # the projection runs as its module: the hook fires in the fused block
    torch.testing.assert_close(block(x, text), reference(x, text), rtol=1e-5, atol=1e-5)
    for b in (block, reference):
        b.norm3.register_forward_hook(add_one)
    assert not block._fusable()
    torch.testing.assert_close(block(x, text), reference(x, text), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_transformer_of_several_blocks_projects_the_text_once_and_chains_their_adds(monkeypatch, device):
    """SDXL's transformers stack blocks: their cross-attention K, V weights become views of one matrix, the text is
    projected for all of them by one GEMM, and each block's last add is done by the next block's norm1. The function
    is the reference's; a LoRA hook on K, a hook on a block and a dtype change each send it back to its own path.
    With --device cuda the fused path runs the Triton kernels (in float32)."""
    from pare.fast.attention import FastAttention
    from pare.models.transformer import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(4, 16, in_channels=64, num_layers=3, norm_num_groups=8, cross_attention_dim=32,
                               use_linear_projection=True).eval().to(device)
    for p in model.parameters():  # non-trivial norms and biases, so that a dropped or doubled term shows
        p.data += 0.1 * torch.randn_like(p)
    reference = copy.deepcopy(model)
    tol = dict(rtol=1e-5, atol=1e-5) if device.type == "cpu" else dict(rtol=1e-4, atol=1e-4)  # Triton's float32 sums
    pare.fast.optimize_model(model)
    stack, _, _, slices = model._context
    weight = stack.weight
    for block, (s, m, e) in zip(model.transformer_blocks, slices):
        assert block.attn2.to_k.weight.data_ptr() == weight[s].data_ptr()
        assert block.attn2.to_v.weight.data_ptr() == weight[m].data_ptr() and block.attn2._fused_ok()
    x, text = torch.randn(2, 64, 4, 5, device=device), torch.randn(2, 7, 32, device=device)
    own_projections = []
    projections = FastAttention.projections
    monkeypatch.setattr(FastAttention, "projections",
                        lambda self, h, context, *a: own_projections.append(context is not None) or projections(
                            self, h, context, *a))
    torch.testing.assert_close(model(x, text), reference(x, text), **tol)
    assert own_projections == [False] * 3  # the self-attentions project their own; no cross-attention does
    hits, handles = [], []
    handles.append(model.transformer_blocks[1].attn2.to_k.register_forward_hook(lambda mod, i, o: hits.append(1) or o + 1.0))
    handles.append(reference.transformer_blocks[1].attn2.to_k.register_forward_hook(lambda mod, i, o: o + 1.0))
    assert model.context_kv(text) is None
    torch.testing.assert_close(model(x, text), reference(x, text), **tol)
    assert hits == [1]
    handles += [m.transformer_blocks[2].register_forward_hook(lambda mod, i, o: o * 2.0) for m in (model, reference)]
    torch.testing.assert_close(model(x, text), reference(x, text), **tol)
    for handle in handles:
        handle.remove()
    model.double()
    reference.double()
    torch.testing.assert_close(model(x.double(), text.double()), reference(x.double(), text.double()))
    assert model._context[0].weight.dtype == torch.float64  # restacked from the new parameters


@torch.no_grad()
def test_a_small_model_projects_the_text_for_all_its_transformers_in_one_gemm(monkeypatch):
    """SD1.x: one K, V stack for every cross-attention of the UNet, projected by the first transformer a call
    runs; a transformer called on its own projects its own columns; `.double()` restacks the whole model."""
    import torch.nn.functional as F

    from pare.fast import transformer as fast_transformer

    ours, theirs = unet_pair(TINY_SD_UNET)
    for p in ours.parameters():  # non-trivial biases, so that a dropped or doubled term shows
        p.data += 0.05 * torch.randn_like(p)
    theirs.load_state_dict(ours.state_dict())
    pare.fast.optimize(ours)
    transformers = [m for m in ours.modules() if isinstance(m, fast_transformer.FastTransformer2DModel)]
    stacks = {id(t._context[0]) for t in transformers}
    assert len(stacks) == 1 and transformers[0]._context[0].users == transformers  # down, mid, up: the call's order
    stack = transformers[0]._context[0].weight
    widths = []  # the rows of every GEMM that reads the stacked weights
    linear = F.linear

    def counted(x, w, b=None):
        if w.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr():
            widths.append(w.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(fast_transformer.F, "linear", counted)
    args, kwargs = unet_inputs(TINY_SD_UNET, 2, 8, 8)
    assert_parity("fast UNet, one K, V stack", ours(*args, **kwargs), theirs(*args, **kwargs).sample, scope="end_to_end")
    assert widths == [stack.shape[0]]  # one projection of the text, for every transformer
    assert transformers[-1]._context[0].product is None  # the last user let it go
    middle = transformers[1]
    x = torch.randn(2, middle.in_channels, 4, 4).contiguous(memory_format=torch.channels_last)
    expected = fast_transformer.Transformer2DModel.forward(middle, x, args[2])  # the reference's forward
    widths.clear()
    torch.testing.assert_close(middle(x, args[2]), expected, rtol=1e-5, atol=1e-5)
    lo, hi = middle._context[1:3]
    assert widths == [hi - lo]  # on its own: only its columns
    ours.double()
    theirs.double()
    args = [a.double() if a.is_floating_point() else a for a in args]
    assert_parity("fast UNet after .double()", ours(*args, **kwargs), theirs(*args, **kwargs).sample,
                  dtype=torch.float64, scope="end_to_end")
    assert {id(t._context[0]) for t in transformers} == {id(transformers[0]._context[0])}  # restacked together
    assert transformers[0]._context[0].weight.dtype == torch.float64


@torch.no_grad()
def test_fast_vae_matches_diffusers_fp32(monkeypatch):
    monkeypatch.setattr(fast_resampling, "PHASE_MIN_PIXELS", 0)  # the tiny maps' upsamplers too: sub-pixel convs
    theirs = build_diffusers_model("vae", TINY_VAE).eval()
    ours = AutoencoderKL.from_config(TINY_VAE).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    pare.fast.optimize(ours)
    z = torch.randn(1, TINY_VAE["latent_channels"], 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_parity("fast VAE decode", ours.decode(z), theirs.decode(z).sample, scope="end_to_end")
    assert_parity("fast VAE encode", ours.encode(x).mean, theirs.encode(x).latent_dist.mean, scope="end_to_end")


@torch.no_grad()
def test_the_fast_vae_reads_its_finite_check_after_queueing_the_decoder(monkeypatch, tmp_path):
    """FastAutoencoderKL's decode and encode count the input's NaNs before their work but read the count after it (so
    a pipeline's decoder is queued behind the loop, not after a wait for it): the same errors as the reference's, and
    a save of the fast model names the reference class."""
    import pare.models.autoencoder_kl as reference
    from pare.fast.autoencoder_kl import FastAutoencoderKL

    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    pare.fast.optimize(vae)
    assert type(vae) is FastAutoencoderKL
    events = []
    real_refuse = reference.refuse_nonfinite
    counted = lambda *a: (events.append("read"), real_refuse(*a))[1]  # noqa: E731
    monkeypatch.setattr("pare.fast.autoencoder_kl.refuse_nonfinite", counted)
    monkeypatch.setattr(reference, "refuse_nonfinite", counted)
    vae.decoder.register_forward_hook(lambda *a: events.append("decoder"))
    vae.encoder.register_forward_hook(lambda *a: events.append("encoder"))
    z = torch.randn(1, TINY_VAE["latent_channels"], 8, 8)
    z[0, 0, 0, 0] = 0.0  # the value a NaN put there turns back into below
    image = vae.decode(z)
    assert events == ["decoder", "read"]  # the decoder was queued before the count was read
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"AutoencoderKL.decode: 1 of 256 latents values are NaN or inf"):
        vae.decode(z)
    x = torch.rand(1, 3, 32, 32)
    events.clear()
    vae.encode(x)
    assert events == ["encoder", "read"]
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"AutoencoderKL.encode: 1 of 3072 images values are NaN or inf"):
        vae.encode(x)
    with pytest.raises(ValueError, match="NaN or inf"):  # the retry path of decode_safely keeps the check
        vae.decode_safely(z)
    assert "_pare_pending" not in vae.__dict__  # nothing left over after an error
    import json
    assert json.loads(vae.save_config(tmp_path).read_text())["_class_name"] == "AutoencoderKL"
    pare.fast.restore(vae)
    assert type(vae) is AutoencoderKL
    events.clear()
    torch.testing.assert_close(vae.decode(z.nan_to_num()), image, rtol=1e-4, atol=1e-5)  # the reference blocks again
    assert events == ["read", "decoder"]  # the reference reads first


@torch.no_grad()
def test_the_sub_pixel_upsampler_is_the_reference_upsampler(monkeypatch):
    """Nearest 2x upsampling and a 3x3 conv as one conv of the four phases' 2x2 kernels (resampling.py): the
    same function, to float64's rounding, at odd and square sizes, with and without the conv's bias. It follows
    the conv's weight when that changes, and leaves the call to the reference where it does not apply."""
    monkeypatch.setattr(fast_resampling, "PHASE_MIN_PIXELS", 0)
    g = torch.Generator().manual_seed(0)
    for c_in, c_out, h, w, bias in [(8, 8, 5, 7, True), (4, 6, 1, 1, False), (16, 16, 8, 8, True)]:
        reference = Upsample2D(c_in, use_conv=True, out_channels=c_out, bias=bias).double()
        fast = copy.deepcopy(reference).to(memory_format=torch.channels_last)
        fast.__class__ = fast_resampling.FastUpsample2D
        x = torch.randn(2, c_in, h, w, generator=g, dtype=torch.float64)
        expected = reference(x)
        assert fast.sub_pixel(x, None)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = fast(inp)
            assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast(x, (2 * h, 2 * w)), expected, rtol=1e-12, atol=1e-12)
    # the weight changed in place (load_state_dict, a fused LoRA): the phase kernels follow it
    fast.conv.weight.mul_(-0.5)
    reference.conv.weight.mul_(-0.5)
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-12, atol=1e-12)
    # where it does not apply: another output size, a hooked (LoRA) conv, a map below the threshold
    assert not fast.sub_pixel(x, (2 * h + 1, 2 * w))
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(fast(x, (2 * h + 1, 2 * w)), reference(x, (2 * h + 1, 2 * w)))
    handle = fast.conv.register_forward_hook(lambda m, args, out: out * 2)
    assert not fast.sub_pixel(x, None)
    close(fast(x), 2 * reference(x))
    handle.remove()
    monkeypatch.setattr(fast_resampling, "PHASE_MIN_PIXELS", 4 * h * w + 1)
    assert not fast.sub_pixel(x, None)
    # optimize swaps it in, restore swaps it out
    monkeypatch.setattr(fast_resampling, "PHASE_MIN_PIXELS", 0)
    model = torch.nn.Sequential(copy.deepcopy(reference))
    pare.fast.optimize(model)
    assert type(model[0]) is fast_resampling.FastUpsample2D
    torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
    pare.fast.restore(model)
    assert type(model[0]) is Upsample2D


def test_enable_fast_on_a_pipeline_matches_the_reference_pipeline():
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin

    theirs = build_diffusers_pipeline("tiny-sd")
    ours = pare_twin(theirs)
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    expected = ours(**kwargs).images
    ours.enable_fast()
    assert type(ours.unet).__name__ == "FastUNet2DConditionModel"  # no CUDA graph on the CPU
    assert "forward" not in vars(ours.text_encoder) and "forward" not in vars(ours.vae.decoder)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert_parity("tiny-sd pipeline, fast", ours(**kwargs).images, expected, scope="end_to_end")
    ours.disable_fast()
    assert not any("Fast" in type(m).__name__ for m in ours.unet.modules())


def test_cuda_graph_true_on_the_cpu_runs_the_once_per_image_modules_eagerly_and_restore_undoes_it():
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin

    ours = pare_twin(build_diffusers_pipeline("tiny-sd"))
    ids = torch.randint(0, 100, (2, 77))
    z = torch.randn(1, 4, 4, 4)
    expected = ours.text_encoder(ids).last_hidden_state, ours.vae.decoder(z)
    pare.fast.optimize(ours, cuda_graph=True)
    for module in (ours.text_encoder, ours.vae.encoder, ours.vae.decoder):
        assert "forward" in vars(module) and "_pare_graphed" in vars(module)
    torch.testing.assert_close(ours.text_encoder(ids).last_hidden_state, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(ours.text_encoder(input_ids=ids).last_hidden_state, expected[0], rtol=0, atol=0)
    assert not ours.text_encoder._pare_graphed.graphs  # CPU tensors: eager, nothing captured
    ours.text_encoder(ids, output_hidden_states=True)  # transformers hooks CLIP's layers to gather them, for good
    assert ours.text_encoder._pare_graphed.hooked() == []  # those hooks are replay-safe: no eager fallback
    getattr(ours.text_encoder, "text_model", ours.text_encoder).encoder.layers[0].register_forward_hook(lambda *a: None)
    assert ours.text_encoder._pare_graphed.hooked() == ["CLIPEncoderLayer"]  # a user's hook is not
    assert "denoise" in vars(ours)  # the loop graph (loop.py) is installed; on CPU tensors it runs step by step
    pare.fast.restore(ours)
    for module in (ours.text_encoder, ours.vae.encoder, ours.vae.decoder):
        assert "forward" not in vars(module) and "_pare_graphed" not in vars(module)
    assert "denoise" not in vars(ours)


@torch.no_grad()
def test_the_fast_path_encodes_a_prompt_and_its_negative_in_one_text_encoder_call():
    """Where the text encoder replays graphs, CFG's prompt and negative prompt go through CLIP as one batch
    (prompt.py): one call of 2B rows, the same embeddings as the reference's two calls (each row sees its own tokens
    only); without CFG, with embeddings given or with clip_skip the reference runs; SDXL keeps its own; restore undoes
    it. The test batches on the CPU, where nothing is replayed, to check the arithmetic."""
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin

    ours = pare_twin(build_diffusers_pipeline("tiny-sd"))
    cases = [(("a cat", 1, True), {}), ((["a cat", "a dog"], 2, True), {"negative_prompt": ["blurry", ""]}),
             (("a cat", 1, True), {"negative_prompt": "blurry"}), (("a cat", 1, False), {}),
             (("a cat", 1, True), {"clip_skip": 1})]
    expected = [ours.encode_prompt(*a, **k) for a, k in cases]
    pare.fast.optimize(ours, cuda_graph=True)
    assert "encode_prompt" in vars(ours)
    rows = []
    ours.text_encoder.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    for (args, kwargs), want in zip(cases, expected):
        rows.clear()
        got = ours.encode_prompt(*args, **kwargs)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        batch = 1 if isinstance(args[0], str) else len(args[0])
        together = args[2] and "clip_skip" not in kwargs
        assert rows == ([2 * batch] if together else [batch] * (1 + args[2])), (args, kwargs, rows)
    pare.fast.restore(ours)
    assert "encode_prompt" not in vars(ours)
    xl = pare_twin(build_diffusers_pipeline("tiny-sdxl"))
    pare.fast.optimize(xl, cuda_graph=True)
    assert "encode_prompt" not in vars(xl)  # SDXL's two encoders and pooled outputs: its own encode_prompt


def test_the_loop_graph_keys_every_scheduler_by_value_and_spots_random_draws():
    """loop.py's key: what a captured loop bakes in. Every pare scheduler's state is keyable; equal schedules give
    equal keys whatever the generator object; another step count or eta gives another. The recorder that keeps
    stochastic loops step by step sees the draws of DDIM with eta > 0 and of Euler ancestral, and none at eta = 0."""
    from pare.fast.loop import Recorder, loop_key, schedule_key
    from pare.schedulers import SCHEDULERS, DDIMScheduler, EulerAncestralDiscreteScheduler

    def key(cls, steps, **step_kwargs):
        s = cls()
        s.set_timesteps(steps)
        return schedule_key(s, step_kwargs)

    for cls in SCHEDULERS.values():
        assert key(cls, 10, eta=0.0) == key(cls, 10, eta=0.0) != key(cls, 11, eta=0.0), cls.__name__
    assert key(DDIMScheduler, 10, generator=torch.Generator()) == key(DDIMScheduler, 10, generator=torch.Generator())
    assert key(DDIMScheduler, 10, eta=0.0) != key(DDIMScheduler, 10, eta=1.0)
    s = DDIMScheduler()
    s.set_timesteps(10)
    s.timesteps[0] += 1  # the key reads values, not identities
    assert schedule_key(s, None) != key(DDIMScheduler, 10)
    s.set_timesteps(10)  # img2img: the same schedule, walked from another step (its strength)
    tail = lambda start, w=7.5: loop_key(s, s.timesteps[start:], None, w, 0.0)  # noqa: E731
    assert tail(4) == tail(4) != tail(5) and tail(4) != tail(4, 5.0)

    x = torch.randn(1, 4, 8, 8)
    for cls, kwargs, draws in ((DDIMScheduler, {"eta": 0.0}, False), (DDIMScheduler, {"eta": 1.0}, True),
                               (EulerAncestralDiscreteScheduler, {}, True)):
        s = cls()
        s.set_timesteps(10)
        with Recorder() as record:
            s.step(x, s.timesteps[0], x, generator=torch.Generator().manual_seed(0), **kwargs)
        assert bool(record.drew) == draws, (cls.__name__, kwargs, record.drew)
        assert record.synced == []  # host numbers and CPU tensors are no reads of the GPU


SCHEDULES_KEPT_ON_THE_HOST = ("DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
                              "DPMSolverSinglestepScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
                              "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler")


@contextlib.contextmanager
def no_syncs():
    """Raise on any call that makes the CPU wait for the GPU (a read back, a blocking copy, a synchronize)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def test_set_timesteps_keeps_the_host_copy_that_the_loop_key_reads(device):
    """`to_device` (scheduling_utils.py): on a GPU, `set_timesteps` keeps the host copy its timesteps came from, so
    the loop graph's key and `host_schedule` read no value back from the GPU, and the copy in does not wait for the
    GPU either (`torch.cuda.set_sync_debug_mode("error")` raises on any synchronising call). The copy answers only
    while the tensor (or a view of it, as img2img's tail of the schedule) is unchanged since. On the CPU there is no
    copy to keep, and the key is read as before."""
    from pare.fast.loop import loop_key, value_key
    from pare.schedulers import SCHEDULERS
    from pare.schedulers.scheduling_utils import host_schedule, host_values

    for name in SCHEDULES_KEPT_ON_THE_HOST:
        s = SCHEDULERS[name]()
        strict = device.type == "cuda"
        with no_syncs() if strict else contextlib.nullcontext():
            s.set_timesteps(10, device=device)
            key = loop_key(s, s.timesteps[2:], None, 7.5, 0.0)
            schedule = host_schedule(s)
        ts = s.timesteps
        assert ts.device.type == device.type, name
        kept = host_values(ts)
        assert (kept is not None) == strict, name
        assert schedule == ts.tolist(), name
        assert key == loop_key(s, ts.clone()[2:], None, 7.5, 0.0), name  # the same key as from a read of the GPU
        if strict:
            assert torch.equal(kept, ts.cpu()) and torch.equal(host_values(ts[2:]), ts[2:].cpu()), name
            ts[3] += 1  # changed in place (here through the tensor, next through a view): the copy is stale
            assert host_values(ts) is None and host_values(ts[2:]) is None, name
            assert value_key(ts) == value_key(ts.clone()), name


def test_host_values_answers_for_a_tensor_and_its_views_until_either_changes():
    """`host_values`'s bookkeeping on the CPU, with the copy that `to_device` keeps on a GPU set by hand."""
    from pare.schedulers.scheduling_utils import host_values

    t = torch.arange(10, dtype=torch.int64)
    assert host_values(t) is None
    t._pare_host = (t._version, t.clone())
    for view in (t, t[3:], t[::2], t[1:7:3]):
        assert torch.equal(host_values(view), view), view
    assert host_values(t.view(torch.float64)) is None  # another dtype: the copy is not its bytes' reading
    t[4:].add_(1)  # through a view: the version counter is shared
    assert host_values(t) is None and host_values(t[3:]) is None


def test_ddpms_step_reads_its_schedule_from_the_host_copy(monkeypatch):
    """A loop graph cannot hold a read of the GPU: once the schedule is on the host (`prime`, before a capture),
    DDPM's step (its previous timestep) reads it there, not from `timesteps` (a CUDA tensor in a pipeline)."""
    from pare.fast.loop import prime
    from pare.schedulers import DDPMScheduler

    s = DDPMScheduler()
    s.set_timesteps(10)
    prime(s)
    schedule, real = s.timesteps, torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("read the schedule") if t is schedule else real(t))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: pytest.fail("read a timestep"))
    x = torch.randn(1, 4, 8, 8)
    for t in s.timesteps[:2]:
        s.step(x, t, x, generator=torch.Generator().manual_seed(0))
    assert s.previous_timestep(s.timesteps[0]) == int(real(schedule)[1])


@torch.no_grad()
def test_the_loop_graph_captures_replays_and_falls_back_as_designed_with_graphs_stood_in_for(monkeypatch):
    """loop.py's logic on the CPU, where a "capture" runs the loop eagerly and a "replay" hands back what it computed
    (so every call here has the same inputs). A deterministic loop is captured once, replays, and leaves the
    scheduler as a loop does. A loop that draws noise (DDIM with eta = 1, Euler ancestral) is captured too, reading
    its noise from a tape that each replay fills from the call's generator: with the draws the stepping loop makes,
    in its order, and the generator left where that loop leaves it. A loop that draws other than through its step's
    `randn_tensor` steps; a draw from a generator the call did not pass marks the tape as one that cannot be drawn
    ahead. The GPU tier checks real graphs, to the bit (test_the_loop_graph_replays_...)."""
    import contextlib

    import pare.fast.graph
    import pare.fast.loop
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin

    ours = pare_twin(build_diffusers_pipeline("tiny-sd"))  # before the stand-ins: diffusers' import reads torch.cuda
    ours.set_progress_bar_config(disable=True)
    replays = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("Graph", (), {"replay": lambda self: replays.append(1)})())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(pare.fast.graph, "share_pool", lambda modules: None)
    monkeypatch.setattr(pare.fast.graph.GraphCache, "warm_up",
                        lambda self, kwargs, device: [self.fn(**kwargs) for _ in range(self.warmup)])
    monkeypatch.setattr(pare.fast.loop, "replayable", lambda x: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.empty(0))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    ours.enable_fast(cuda_graph=True)  # on CPU tensors the UNet itself runs eagerly
    graphed = vars(ours)["denoise"]
    latents = torch.randn(ours.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))

    def run(**kwargs):
        kwargs = {"generator": torch.Generator().manual_seed(1), **kwargs}
        return ours(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="latent", latents=latents,
                    **kwargs).images

    from pare.schedulers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    from pare.schedulers import scheduling_utils

    config, stepping = ours.scheduler.config, functools.partial(pare.fast.denoise.denoise, ours)
    real_randn = scheduling_utils.randn_tensor
    for cls, kwargs, draws in ((EulerDiscreteScheduler, {}, False), (DDIMScheduler, {"eta": 1.0}, True),
                               (EulerAncestralDiscreteScheduler, {}, True)):
        ours.scheduler = cls.from_config(config)
        vars(ours)["denoise"] = graphed
        replays.clear()
        got, left = [], []
        for _ in range(2):
            g = torch.Generator().manual_seed(1)
            got.append(run(generator=g, **kwargs))
            left.append(g.get_state())  # where the replay's draws left the generator
        entries = list(ours._pare_loop.graphs.values())
        after = plain_state(ours.scheduler)  # Euler's step index: as the captured run left it
        vars(ours)["denoise"] = stepping  # the loop the graph holds, stepping, its draws kept
        drawn, module = [], type(ours.scheduler).step.__globals__
        module["randn_tensor"] = lambda *a: drawn.append(real_randn(*a)) or drawn[-1]
        try:
            g = torch.Generator().manual_seed(1)
            expected = run(generator=g, **kwargs)
        finally:
            module["randn_tensor"] = real_randn
        assert len(replays) == 2 and entries[-1] is not None, cls.__name__  # both calls replay (Euler's: two keys)
        assert after == plain_state(ours.scheduler)
        assert all(torch.equal(state, g.get_state()) for state in left), cls.__name__
        tape = entries[-1][4]
        if not draws:
            assert tape is None and drawn == [] and all(torch.equal(x, expected) for x in got)
            continue
        # the stand-in "replay" hands back the capture's result, whose noise the replay had not drawn yet: the tape
        # is checked instead, filled by the last replay with the stepping loop's draws
        assert len(drawn) == 3 and torch.equal(tape.play, torch.stack(drawn)), cls.__name__

    own = torch.Generator().manual_seed(5)

    class OwnNoise(EulerAncestralDiscreteScheduler):  # draws from a generator of its own, outside the tape
        def step(self, *args, generator=None, **kwargs):
            return super().step(*args, generator=own, **kwargs)

    ours.scheduler = OwnNoise.from_config(config)
    vars(ours)["denoise"] = graphed
    replays.clear()
    run()
    assert replays == [] and list(ours._pare_loop.graphs.values())[-1] is None  # it steps
    from pare.fast.noise import Tape

    tape = Tape(torch.Generator())
    tape.draw((2, 3), torch.Generator(), "cpu", torch.float32)  # not the call's generator: no draw made ahead
    assert tape.foreign and len(tape.specs) == 1


@torch.no_grad()
def test_the_fused_step_loop_gives_the_class_loops_latents_and_leaves_every_other_loop_to_it(monkeypatch):
    """pare/fast/denoise.py: a plain DDIM loop (eta 0, no clipping), Euler, Euler ancestral, DPM-Solver++ (2M, 3M, SDE),
    UniPC, DEIS or PLMS loop
    under guidance, epsilon or v prediction, runs one fused step a UNet call; its latents are the class loop's (float64
    here: within the float32 rounding of the reference's alpha_bar roots and sigmas; Euler a's noise drawn from the
    call's generator as its step draws it, so the same noise), a step callback's seen and its
    replaced latents used, and the scheduler is left in the class loop's state (its step index, DPM-Solver's order
    count and history of x_0 predictions, PLMS's counter and outputs). Any other loop (eta > 0, clipping, guidance
    rescale, no guidance, a noise-prediction DPM-Solver or UniPC, thresholding, PNDM's Runge-Kutta warm-up, another
    scheduler) is the class's own: no fused step,
    the same latents to the bit."""
    import pare.fast.denoise as fast_denoise
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin
    from pare.schedulers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                                 EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler,
                                 PNDMScheduler, UniPCMultistepScheduler)

    ours = pare_twin(build_diffusers_pipeline("tiny-sd"), torch.float64)
    ours.set_progress_bar_config(disable=True)
    fused_steps = []
    step = fast_denoise.guided_step
    monkeypatch.setattr(fast_denoise, "guided_step", lambda *a, **k: fused_steps.append(1) or step(*a, **k))
    latents = torch.randn(ours.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(fused: bool, num_inference_steps=3, **kwargs):
        if fused:
            vars(ours)["denoise"] = functools.partial(fast_denoise.denoise, ours)
        else:
            vars(ours).pop("denoise", None)
        return ours(prompt="a cat", num_inference_steps=num_inference_steps, height=32, width=32, output_type="latent",
                    latents=latents, generator=torch.Generator().manual_seed(1), **kwargs).images

    config, seen = ours.scheduler.config, []
    halve = lambda pipe, i, t, tensors: {"latents": tensors["latents"] / 2} if i == 1 else {}  # noqa: E731
    for cls, overrides, kwargs, fused in (
            (DDIMScheduler, {}, {}, True), (DDIMScheduler, {"prediction_type": "v_prediction"}, {}, True),
            (DDIMScheduler, {}, {"eta": 1.0}, False), (DDIMScheduler, {"clip_sample": True}, {}, False),
            (DDIMScheduler, {}, {"guidance_rescale": 0.7}, False), (DDIMScheduler, {}, {"guidance_scale": 1.0}, False),
            (DDIMScheduler, {}, {"callback_on_step_end": lambda pipe, i, t, tensors: seen.append(i) or {}}, True),
            (DDIMScheduler, {}, {"callback_on_step_end": halve}, True),
            (EulerDiscreteScheduler, {}, {}, True), (EulerDiscreteScheduler, {"prediction_type": "v_prediction"}, {}, True),
            (EulerDiscreteScheduler, {"use_karras_sigmas": True}, {"callback_on_step_end": halve}, True),
            (EulerAncestralDiscreteScheduler, {}, {}, True),  # its noise drawn by the loop, as its step draws it
            (EulerAncestralDiscreteScheduler, {"prediction_type": "v_prediction"}, {"callback_on_step_end": halve}, True),
            (DPMSolverMultistepScheduler, {}, {}, True),  # orders 1, 2, 1
            (DPMSolverMultistepScheduler, {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}, {}, True),
            (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "solver_type": "heun"},
             {"callback_on_step_end": halve}, True),
            (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, {}, True),  # its noise drawn by the loop
            (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                           "prediction_type": "v_prediction", "use_karras_sigmas": True},
             {"callback_on_step_end": halve}, True),
            (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, {}, False),
            (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}, False),
            (DPMSolverMultistepScheduler, {"solver_order": 3}, {}, True),  # orders 1, 2, 1: 3M needs 5 steps
            (DPMSolverMultistepScheduler, {"solver_order": 3}, {"num_inference_steps": 5}, True),  # 1, 2, 3, 2, 1
            (DPMSolverMultistepScheduler, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
                                           "prediction_type": "v_prediction"},
             {"num_inference_steps": 5, "callback_on_step_end": halve}, True),
            (DPMSolverMultistepScheduler, {"solver_order": 3, "lower_order_final": False}, {"num_inference_steps": 4},
             True),  # 1, 2, 3, 1 (the last: final sigma 0)
            (DPMSolverMultistepScheduler, {"thresholding": True}, {}, False),
            (UniPCMultistepScheduler, {}, {}, True),  # corrector orders 0, 1, 2 with predictor orders 1, 2, 1
            (UniPCMultistepScheduler, {"prediction_type": "v_prediction", "solver_type": "bh1",
                                       "final_sigmas_type": "sigma_min"}, {}, True),
            (UniPCMultistepScheduler, {"use_karras_sigmas": True, "disable_corrector": [1]},
             {"callback_on_step_end": halve}, True),
            (UniPCMultistepScheduler, {"solver_order": 1}, {}, True),
            (UniPCMultistepScheduler, {"solver_order": 3}, {"num_inference_steps": 5}, True),  # UniC 0-1-2-3-2, UniP 1-2-3-2-1
            (UniPCMultistepScheduler, {"solver_order": 3, "lower_order_final": False, "solver_type": "bh1",
                                       "prediction_type": "v_prediction", "use_karras_sigmas": True,
                                       "final_sigmas_type": "sigma_min"},
             {"num_inference_steps": 4, "callback_on_step_end": halve}, True),  # UniC 0-1-2-3, UniP 1-2-3-3
            (UniPCMultistepScheduler, {"solver_order": 3, "disable_corrector": [2]}, {"num_inference_steps": 5}, True),
            (UniPCMultistepScheduler, {"predict_x0": False, "final_sigmas_type": "sigma_min"}, {}, False),
            (UniPCMultistepScheduler, {"thresholding": True}, {}, False),
            (DEISMultistepScheduler, {}, {}, True),  # orders 1, 2, 1
            (DEISMultistepScheduler, {"prediction_type": "v_prediction", "use_karras_sigmas": True},
             {"callback_on_step_end": halve}, True),
            (DEISMultistepScheduler, {"solver_order": 3}, {"num_inference_steps": 5}, True),  # 1, 2, 3, 2, 1
            (DEISMultistepScheduler, {"solver_order": 3, "lower_order_final": False, "prediction_type": "v_prediction"},
             {"num_inference_steps": 4}, True),  # 1, 2, 3, 3
            (DEISMultistepScheduler, {"thresholding": True}, {}, False),
            (DEISMultistepScheduler, {"prediction_type": "sample"}, {}, False),
            # PLMS: Euler, its redo from the kept sample, Adams-Bashforth 2, 3, 4, then 4 over the last four outputs
            (PNDMScheduler, {"skip_prk_steps": True}, {"num_inference_steps": 6}, True),
            (PNDMScheduler, {"skip_prk_steps": True, "prediction_type": "v_prediction", "set_alpha_to_one": True},
             {"num_inference_steps": 5, "callback_on_step_end": halve}, True),
            (PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "trailing"}, {}, True),
            (PNDMScheduler, {"skip_prk_steps": False}, {"num_inference_steps": 4}, False),
            # LMS: orders 1, 2, 3, 4, then 4 over the last four derivatives
            (LMSDiscreteScheduler, {}, {"num_inference_steps": 6}, True),
            (LMSDiscreteScheduler, {"prediction_type": "v_prediction", "use_karras_sigmas": True},
             {"num_inference_steps": 5, "callback_on_step_end": halve}, True),
            (LMSDiscreteScheduler, {"timestep_spacing": "trailing"}, {}, True),
            (LMSDiscreteScheduler, {"prediction_type": "sample"}, {}, False)):
        ours.scheduler = cls.from_config(config, **overrides)
        fused_steps.clear()
        got = run(True, **kwargs)
        def kept_outputs(s):  # the history: model_outputs, PLMS's ets, LMS's derivatives
            return list(getattr(s, "model_outputs", getattr(s, "ets", getattr(s, "derivatives", []))))
        state, history = plain_state(ours.scheduler), kept_outputs(ours.scheduler)
        last = getattr(ours.scheduler, "last_sample", None)  # UniPC's
        calls = len(ours.scheduler.timesteps)  # a UNet call a timestep (PLMS: one more than its steps)
        assert len(fused_steps) == (calls if fused else 0), (cls.__name__, overrides, kwargs)
        expected = run(False, **kwargs)
        assert state == plain_state(ours.scheduler), (cls.__name__, overrides, kwargs)
        if fused:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            for kept, theirs in zip(history, kept_outputs(ours.scheduler), strict=True):  # multistep
                torch.testing.assert_close(kept, theirs, rtol=1e-5, atol=1e-5)
            if last is not None:
                torch.testing.assert_close(last, ours.scheduler.last_sample, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, expected), (cls.__name__, overrides, kwargs)
    assert seen == [0, 1, 2] * 2
    ours.scheduler = DDIMScheduler.from_config(config)
    expected = [run(False, **kwargs) for kwargs in ({}, {"callback_on_step_end": halve})]
    pare.fast.optimize(ours, cuda_graph=True)  # the loop graph's entry; CPU latents: it runs step by step, fused
    halves = pare.fast.unet.FastUNet2DConditionModel.forward_halves  # the fast UNet, told the halves are equal
    monkeypatch.setattr(pare.fast.unet.FastUNet2DConditionModel, "forward_halves",
                        lambda *a, **k: fused_steps.append("halves") or halves(*a, **k))
    for kwargs, want in zip(({}, {"callback_on_step_end": halve}), expected):
        fused_steps.clear()
        got = ours(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="latent", latents=latents,
                   generator=torch.Generator().manual_seed(1), **kwargs).images
        assert fused_steps == ["halves", 1] * 3
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    pare.fast.restore(ours)
    # img2img: the loop starts mid-schedule (PLMS's first call at a later timestep, DPM-Solver's first order there)
    img2img = pare.StableDiffusionImg2ImgPipeline(**ours.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cls, overrides in ((PNDMScheduler, {"skip_prk_steps": True}), (DDIMScheduler, {}),
                           (DPMSolverMultistepScheduler, {}), (LMSDiscreteScheduler, {})):  # LMS: order 4, one derivative
        img2img.scheduler = cls.from_config(config, **overrides)
        got_expected = []
        for fused in (True, False):
            fused_steps.clear()
            if fused:
                vars(img2img)["denoise"] = functools.partial(fast_denoise.denoise, img2img)
            else:
                vars(img2img).pop("denoise", None)
            got_expected.append(img2img(prompt="a cat", image=image, strength=0.6, num_inference_steps=8,
                                        output_type="latent", generator=torch.Generator().manual_seed(1)).images)
            assert len(fused_steps) == (int(8 * 0.6) + (cls is PNDMScheduler) if fused else 0), cls.__name__
        torch.testing.assert_close(*got_expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(fast_denoise, "FUSED_STEP", 0)  # the A/B's switch
    fused_steps.clear()
    run(True)
    assert fused_steps == []


@torch.no_grad()
def test_the_unet_runs_a_cfg_batchs_text_free_prefix_on_one_half_where_it_may(monkeypatch):
    """pare/fast/unet.py: with same_halves, a CFG batch's conv_in, first ResNet and first self-attention run on one
    half (a hook on the ResNet sees B rows, not 2B), and the output is the whole batch's; where the prefix is not
    text-free (SDXL's text_time embedding, a timestep per sample, a mask) or the batch is odd, the whole batch runs,
    the same result to the bit. The fused DDIM loop says same_halves, but not while a hook sits inside the UNet."""
    import pare.fast.denoise as fast_denoise
    import pare.fast.unet as fast_unet

    def batches_seen(model):
        seen = []
        handle = model.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        return seen, handle

    for name, b in (("tiny-sd", 1), ("tiny-sd", 2)):
        ours, _ = unet_pair(CONFIGS[name], dtype=torch.float64)
        pare.fast.optimize(ours)
        (x, t, text), _ = unet_inputs(CONFIGS[name], 2 * b, 8, 8)
        x, text = torch.cat([x[:b]] * 2).double(), text.double()  # a CFG batch: the latents twice, two texts
        seen, handle = batches_seen(ours)
        expected, got = ours(x, t, text), ours(x, t, text, same_halves=True)
        assert seen == [2 * b, b]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert fast_denoise.shares_prefix(ours) is False  # the hook is inside the UNet
        handle.remove()
        assert fast_denoise.shares_prefix(ours) is True
        for args, kwargs in (((x, torch.tensor([t] * 2 * b), text), {}),  # a timestep per sample
                             ((torch.cat([x, x[:1]]), t, torch.cat([text, text[:1]])), {}),  # an odd batch
                             ((x, t, text), {"encoder_attention_mask": torch.ones(2 * b, text.shape[1])})):
            seen, handle = batches_seen(ours)
            assert torch.equal(ours(*args, same_halves=True, **kwargs), ours(*args, **kwargs))
            assert seen == [args[0].shape[0]] * 2
            handle.remove()
        monkeypatch.setattr(fast_unet, "SHARED_PREFIX", 0)  # the A/B's switch
        seen, handle = batches_seen(ours)
        ours(x, t, text, same_halves=True)
        assert seen == [2 * b]
        handle.remove()
        monkeypatch.setattr(fast_unet, "SHARED_PREFIX", 1)
        with pytest.raises(ValueError, match="halves=True"):
            ours.down_blocks[0].attentions[0](x[:b].new_zeros(b, 8, 8, 8), text, attention_mask=text.new_ones(b, 1, 64),
                                              halves=True)

    ours, _ = unet_pair(TINY_SDXL_UNET, dtype=torch.float64)
    pare.fast.optimize(ours)
    (x, t, text), kwargs = unet_inputs(TINY_SDXL_UNET, 2, 8, 8)
    x, text = torch.cat([x[:1]] * 2).double(), text.double()
    kwargs = {"added_cond_kwargs": {k: v.double() for k, v in kwargs["added_cond_kwargs"].items()}}
    seen, handle = batches_seen(ours)
    assert torch.equal(ours(x, t, text, same_halves=True, **kwargs), ours(x, t, text, **kwargs))
    assert seen == [2, 2]  # SDXL's pooled text enters the time embedding: its first ResNet differs by half


@torch.no_grad()
def test_the_fused_loop_projects_the_texts_k_and_v_once_and_again_only_for_a_new_text(monkeypatch):
    """pare/fast/transformer.py hold_context, as denoise.py opens it around an eagerly run loop: the model-wide stack
    of the text's K and V is projected at the first step only, again when a callback hands in new prompt embeddings,
    and at every step with HOLD_TEXT off; the latents are the same to the bit, and the product is let go after."""
    import pare.fast.denoise as fast_denoise
    import pare.fast.transformer as fast_transformer
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin
    from pare.schedulers import DDIMScheduler

    ours = pare_twin(build_diffusers_pipeline("tiny-sd"))
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    pare.fast.optimize(ours)
    vars(ours)["denoise"] = functools.partial(fast_denoise.denoise, ours)  # on the CPU: the fused loop, eager
    stack = ours.unet.down_blocks[0].attentions[0]._context[0]
    projections, functional = [], fast_transformer.F

    class Counting:  # F.linear, counting the stack's GEMMs
        def __getattr__(self, name):
            return getattr(functional, name)

        def linear(self, x, weight, bias=None):
            projections.append(weight is stack.weight)
            return functional.linear(x, weight, bias)

    monkeypatch.setattr(fast_transformer, "F", Counting())
    def new_text(pipe, i, t, tensors):  # the same values in a new tensor, after step 2
        return {"prompt_embeds": tensors["prompt_embeds"] * 1.0} if i == 1 else {}

    def run(**kwargs):
        projections.clear()
        latents = ours(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="latent",
                       generator=torch.Generator().manual_seed(1), **kwargs).images
        return latents, sum(projections)

    held, n_held = run()
    renewed, n_renewed = run(callback_on_step_end=new_text, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert (n_held, n_renewed) == (1, 2)
    assert stack.product is None and not stack.held
    monkeypatch.setattr(fast_denoise, "replayable", torch.is_tensor)  # as if the UNet replayed its per-call graphs
    replaying, n_replaying = run()
    monkeypatch.undo()
    assert n_replaying == 3  # not held: a per-call graph's capture would leave the projection out, its K, V stale
    monkeypatch.setattr(fast_transformer, "F", Counting())
    monkeypatch.setattr(fast_denoise, "HOLD_TEXT", 0)
    every, n_every = run()
    assert n_every == 3 and torch.equal(held, every) and torch.equal(renewed, every) and torch.equal(replaying, every)


def test_only_loops_that_read_only_their_arguments_get_a_loop_graph():
    """ControlNet's and inpainting's loops read tensors that are not their arguments (the condition image, the
    mask), which a graph would bake in: they keep their own loop."""
    from pare.fast.loop import graph_denoise
    from pare.pipelines import (StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                                StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)

    for cls, graphed in ((StableDiffusionPipeline, True), (StableDiffusionImg2ImgPipeline, True),
                         (StableDiffusionXLPipeline, True), (StableDiffusionControlNetPipeline, False),
                         (StableDiffusionInpaintPipeline, False)):
        pipe = object.__new__(cls)
        assert graph_denoise(pipe) is graphed and ("denoise" in vars(pipe)) is graphed, cls.__name__


SYNCING_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "aten.equal", "masked_select", "unique")


@torch.no_grad()
def test_what_the_graphs_replay_makes_no_synchronising_op(monkeypatch):
    """A CUDA graph capture fails on an op that reads a value back to the host. On the CPU, with the capture's
    checks emulated, the calls a fast pipeline captures (its UNet, text encoders, VAE encoder and decoder) must make
    none: a guard against such an op creeping into pare's code or transformers' CLIP."""
    import pare.fast.autoencoder_kl
    import pare.models.autoencoder_kl
    import pare.validation
    from torch.utils._python_dispatch import TorchDispatchMode

    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin

    ours = pare_twin(build_diffusers_pipeline("tiny-sdxl"))
    ours.enable_fast()
    for module in (pare.validation, pare.models.autoencoder_kl, pare.fast.autoencoder_kl):  # as while capturing:
        # the NaN checks step aside
        monkeypatch.setattr(module, "_tracing", lambda x: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(op in str(func) for op in SYNCING_OPS):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, 100, (2, 77))
    args, kwargs = unet_inputs(TINY_SDXL_UNET, 2, 8, 8)
    with Record():
        ours.text_encoder(ids, output_hidden_states=True)
        ours.text_encoder_2(ids, output_hidden_states=True)
        UNet2DConditionModel.forward(ours.unet, *args, **kwargs)  # what GraphedUNet2DConditionModel captures
        ours.vae.decode(torch.randn(1, 4, 8, 8))
        ours.vae.encode(torch.randn(1, 3, 64, 64))
    assert seen == []


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: `replay` recomputes the captured call on its static inputs."""

    def __init__(self, fn, static, out):
        self.fn, self.static, self.out = fn, static, out

    def replay(self):
        self.out.copy_(self.fn(x=self.static[0]))


def fake_graph_cache(monkeypatch, model):
    """A GraphCache over `model(x)` whose captures are `_FakeGraph`s; returns it and the log of what ran."""
    from pare.fast.graph import GraphCache

    log = []
    fn = lambda x: (log.append("eager"), model(x))[1]  # noqa: E731
    cache = GraphCache(fn, model)

    def capture(leaves, spec):
        log.append("capture")
        static = [l.clone() for l in leaves]
        return _FakeGraph(fn, static, fn(x=static[0])), static, fn(x=static[0])

    monkeypatch.setattr(cache, "capture", capture)
    return cache, log


def test_graph_cache_drops_stale_graphs_and_captures_only_weights_seen_twice(monkeypatch):
    """Weights that move at every call (a per-call cast) must not cost a capture per call, nor replay stale."""
    model = torch.nn.Linear(3, 3)
    cache, log = fake_graph_cache(monkeypatch, model)
    x = torch.randn(2, 3)
    with torch.no_grad():
        cache(x=x)
        assert log == ["capture", "eager", "eager", "eager"]  # captured at once (a replay follows)
        log.clear()
        torch.testing.assert_close(cache(x=x), model(x), rtol=0, atol=0)
        assert log == ["eager"]  # only the fake replay's recomputation: no new capture
        model.weight = torch.nn.Parameter(torch.randn(3, 3))  # new weights: the graph is stale
        log.clear()
        torch.testing.assert_close(cache(x=x), model(x), rtol=0, atol=0)
        assert log == ["eager"] and not cache.graphs  # eager, and the stale graph is gone
        log.clear()
        cache(x=x)  # the weights stayed put: capture now
        assert log[0] == "capture" and len(cache.graphs) == 1


def test_graph_cache_sees_weights_moved_in_place_and_a_parameter_set_to_none(monkeypatch):
    """`.data` assigned (what `module.to()` does) moves a weight without replacing the Parameter; a parameter set to
    None leaves a slot empty. Either is new weights: the graphs of the old ones are dropped, never replayed."""
    model = torch.nn.Linear(3, 3)
    cache, log = fake_graph_cache(monkeypatch, model)
    x = torch.randn(2, 3)
    with torch.no_grad():
        cache(x=x)
        model.weight.data = torch.randn(3, 3)  # the same Parameter, its data elsewhere
        log.clear()
        torch.testing.assert_close(cache(x=x), model(x), rtol=0, atol=0)
        assert log == ["eager"] and not cache.graphs
        cache(x=x)  # seen twice at the same place: captured again
        assert len(cache.graphs) == 1
        model.bias = None  # an empty slot: walked again, and new weights
        log.clear()
        torch.testing.assert_close(cache(x=x), model(x), rtol=0, atol=0)
        assert log == ["eager"] and not cache.graphs


def test_graph_cache_runs_hooked_submodules_eagerly_and_sees_a_swapped_submodule(monkeypatch, caplog):
    """A replay runs kernels, not Python: a submodule's forward hook must make the call eager (LoRA's excepted,
    which the key follows); a submodule swapped for another is new weights, never replayed stale."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    cache, log = fake_graph_cache(monkeypatch, model)
    x = torch.randn(2, 3)
    with torch.no_grad():
        cache(x=x)
        seen = []
        handle = model[0].register_forward_hook(lambda m, a, o: seen.append(1))
        log.clear()
        cache(x=x)
        cache(x=x)
        assert seen == [1, 1] and log == ["eager", "eager"]  # the hook fired: eager, no replay
        assert sum("runs eagerly" in r.message for r in caplog.records) == 1  # said once
        handle.remove()

        class LoRALike:  # stands in for pare.lora.layers.LoRAHook: its bound method is the hook
            enabled, original_weight, active = True, None, {}

            def hook(self, m, a, o):
                return o

        lora = LoRALike()
        object.__setattr__(model, "_pare_lora_hooks", {"0": lora})
        handle = model[0].register_forward_hook(lora.hook)
        cache(x=x)  # a new LoRA state: a new graph
        log.clear()
        cache(x=x)
        assert log == ["eager"]  # a replay (the fake one recomputes once): LoRA's hook does not force eager
        handle.remove()
        object.__delattr__(model, "_pare_lora_hooks")
        model[0] = torch.nn.Linear(3, 3)  # swapped: new weights
        log.clear()
        torch.testing.assert_close(cache(x=x), model(x), rtol=0, atol=0)
        assert log == ["eager"] and not cache.graphs


def test_the_graphed_unet_checks_each_input_tensor_once_but_sees_in_place_changes(monkeypatch):
    """The finite check is a host read (a wait for the GPU): the same, unchanged tensors are not read again."""
    import pare.fast.graph as graph

    read = []
    real = graph.check_finite_inputs
    monkeypatch.setattr(graph, "check_finite_inputs", lambda owner, **t: (read.append(sorted(t)), real(owner, **t)))
    model = torch.nn.Linear(1, 1)
    schedule, text = torch.linspace(999.0, 0.0, 5), torch.randn(2, 7, 8)
    for t in schedule:  # each step's timestep is a view of the schedule: the schedule is read once
        graph.check_finite_once(model, timestep=t, encoder_hidden_states=text)
    assert read == [["encoder_hidden_states", "timestep"]] + [[]] * 4
    text[0, 0, 0] = float("nan")  # an in-place change bumps the version: read again, and refused
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        graph.check_finite_once(model, timestep=schedule[0], encoder_hidden_states=text)
    with pytest.raises(ValueError, match="timestep"):  # a new tensor is read
        graph.check_finite_once(model, timestep=torch.tensor(float("inf")), encoder_hidden_states=torch.ones(1))
    with torch.inference_mode():  # inference tensors keep no version counter: read every time
        text = torch.randn(2, 7, 8)
        read.clear()
        for _ in range(2):
            graph.check_finite_once(model, encoder_hidden_states=text)
        assert read == [["encoder_hidden_states"]] * 2


def test_optimize_rejects_what_it_cannot_optimize():
    with pytest.raises(TypeError, match="neither a torch module nor a pipeline"):
        pare.fast.optimize(object())


def test_pare_parity_fast_passes_on_the_tiny_checkpoint(capsys):
    from pare.cli import main

    assert main(["parity", "--fast", "--components", "unet,vae", "--steps", "2"]) == 0
    assert "pass" in capsys.readouterr().out.lower()


# --- Kernel tier: each Triton kernel against its twin, on CUDA or under Triton's interpreter --------
# `kernel` tests run with --device cuda, or on the CPU with TRITON_INTERPRET=1 (set before Python starts), which
# runs the same kernels, program by program, in Python: CI does the latter (`-m kernel`). The interpreter is slow,
# so there the largest shapes are left to the GPU.

KDEV = "cpu" if INTERPRET else "cuda"  # where the kernel tests' tensors live
needs_triton = pytest.mark.skipif(not triton_available(), reason="the Triton kernels need Triton installed")


def gpu_size(*values):
    """A parameter too large for the interpreter's pace: run on the GPU only."""
    return pytest.param(*values, marks=pytest.mark.skipif(INTERPRET, reason="too large for Triton's interpreter"))
BUDGET, FLOOR = 1.25, {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 1e-6}


def rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [gpu_size((2, 320, 64, 64, 32)), (2, 2560, 8, 8, 32), gpu_size((1, 128, 256, 256, 32)),
                                   gpu_size((2, 960, 32, 32, 32)), (3, 40, 5, 7, 4), (1, 64, 3, 3, 32),
                                   gpu_size((1, 128, 128, 250, 32)),
                                   (2, 320, 11, 13, 32)])  # the last: several stats tiles, the last one partial
@pytest.mark.parametrize("add,silu", [(False, False), (True, True), (False, True)])
def test_group_norm_kernel_is_as_accurate_as_torch(shape, dtype, add, silu):
    b, c, h, w, groups = shape
    g = torch.Generator(KDEV).manual_seed(hash((shape, add, silu)) % 2**31)
    x = (torch.randn(b, c, h, w, generator=g, device=KDEV) * 3 + 2).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=g, device=KDEV).to(dtype)
    bias = torch.randn(c, generator=g, device=KDEV).to(dtype)
    # add: a strided (B, C) slice, as the stacked time projections hand it over, and a conv's (C,) bias
    extra = torch.randn(b, 2 * c, generator=g, device=KDEV).to(dtype)[:, c:] if add else None
    cadd = torch.randn(c, generator=g, device=KDEV).to(dtype) if add else None
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    exact = gn_kernel.reference(x.double(), groups, weight.double(), bias.double(), 1e-6, wide(extra), silu, wide(cadd))
    ours = gn_kernel.group_norm(x, groups, weight, bias, 1e-6, add=extra, silu=silu, channel_add=cadd)
    torchs = gn_kernel.reference(x, groups, weight, bias, 1e-6, extra, silu, cadd)
    assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == dtype
    assert torch.isfinite(ours).all()
    assert rel(ours, exact) <= BUDGET * rel(torchs, exact) + FLOOR[dtype], (rel(ours, exact), rel(torchs, exact))


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("biases", [1, 2])
def test_add_bias_residual_kernel_is_as_accurate_as_torch(dtype, biases):
    """conv2's output + the shortcut + conv2's bias (+ the shortcut conv's bias), in one pass, in place."""
    g = torch.Generator(KDEV).manual_seed(biases)
    x, r = (torch.randn(2, 320, 13, 11, generator=g, device=KDEV).to(dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    b1, b2 = (torch.randn(320, generator=g, device=KDEV).to(dtype) for _ in range(2))
    b2 = b2 if biases == 2 else None
    exact = x.double() + r.double() + b1.double()[:, None, None] + (0 if b2 is None else b2.double()[:, None, None])
    torchs = (x + b1[:, None, None]) + (r if b2 is None else r + b2[:, None, None])  # the reference's roundings
    ours = gn_kernel.add_bias_residual(x.clone(), r, b1, b2)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    assert rel(ours, exact) <= BUDGET * rel(torchs, exact) + FLOOR[dtype], (rel(ours, exact), rel(torchs, exact))


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [gpu_size((2, 4096, 320)), gpu_size((2, 1024, 1280)), (2, 77, 640), (3, 5, 40),
                                   (1, 3, 5000)])
def test_layer_norm_kernel_is_as_accurate_as_torch(shape, dtype):
    if INTERPRET and dtype == torch.bfloat16:  # its sum is checked bit for bit, against PyTorch's rounding
        pytest.skip("Triton's interpreter converts to bfloat16 without rounding to nearest as the GPU does "
                    "(sums one ulp apart)")
    g = torch.Generator(KDEV).manual_seed(sum(shape))
    c = shape[-1]
    x = (torch.randn(*shape, generator=g, device=KDEV) * 3 + 2).to(dtype)
    residual = torch.randn(*shape, generator=g, device=KDEV).to(dtype)
    weight, bias = (torch.randn(c, generator=g, device=KDEV).to(dtype) for _ in range(2))
    row = torch.randn(c, generator=g, device=KDEV).to(dtype)  # a bias added to every row: proj_in's
    for res in (None, residual, row):
        h, y = ln_kernel.layer_norm(x, weight, bias, 1e-5, residual=res)
        torch_h, torch_y = ln_kernel.reference(x, weight, bias, 1e-5, res)
        _, exact_y = ln_kernel.reference(torch_h.double(), weight.double(), bias.double(), 1e-5)
        assert y.dtype == h.dtype == dtype and y.is_contiguous()
        assert torch.equal(h, torch_h)  # the residual stream rounds as the reference's add does
        assert rel(y, exact_y) <= BUDGET * rel(torch_y, exact_y) + FLOOR[dtype], (rel(y, exact_y), rel(torch_y, exact_y))


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [gpu_size((2, 4096, 2 * 1280)), (2, 77, 2 * 640), (3, 5, 2 * 1000)])
def test_geglu_kernel_is_as_accurate_as_torch(shape, dtype):
    g = torch.Generator(KDEV).manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g, device=KDEV) * 2).to(dtype)
    exact = geglu_kernel.reference(x.double())
    ours = geglu_kernel.geglu(x)
    assert ours.shape == exact.shape and torch.isfinite(ours).all()
    assert rel(ours, exact) <= BUDGET * rel(geglu_kernel.reference(x), exact) + FLOOR[dtype]


class CountedLaunches:
    """A Triton kernel object that counts its launches (`kernel[grid](...)`)."""
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,d,bias", [gpu_size(8192, 320, 1280, True), gpu_size(2048, 640, 2560, True),
                                        gpu_size(128, 1280, 5120, True), gpu_size(8192, 640, 2560, True),
                                        (256, 320, 128, True),  # SD1.5's K; whole tiles
                                        (130, 80, 96, False)])  # partial row, column and K tiles; no bias
def test_geglu_linear_kernel_is_as_accurate_as_torch(m, k, d, bias, dtype, monkeypatch):
    """The up-projection and the gate in one GEMM, against PyTorch's linear layer and then the gate. The kernel
    runs at every size here (GEMM_MIN_ROWS lowered), and the test checks that it did."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bfloat16 tiles wrongly in tl.dot (off by 1e10 on a 16x16 "
                    "product whose loads are exact); bfloat16 runs on the GPU")
    if not INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused GEMM loads its tiles by TMA: Hopper or later")
    launched = CountedLaunches(geglu_kernel.geglu_linear_kernel)
    monkeypatch.setattr(geglu_kernel, "GEMM_MIN_ROWS", 1)
    monkeypatch.setattr(geglu_kernel, "geglu_linear_kernel", launched)
    g = torch.Generator(KDEV).manual_seed(m + k + d)
    x = torch.randn(2, m // 2, k, generator=g, device=KDEV).to(dtype)
    weight = (torch.randn(2 * d, k, generator=g, device=KDEV) / k**0.5).to(dtype)
    b = torch.randn(2 * d, generator=g, device=KDEV).to(dtype) if bias else None
    exact = geglu_kernel.reference(F.linear(x.double(), weight.double(), None if b is None else b.double()))
    ours = geglu_kernel.geglu_linear(x, weight, b)
    torchs = geglu_kernel.reference(F.linear(x, weight, b))  # the reference module's roundings
    assert launched.calls == 1, "the fused GEMM did not run"
    assert ours.shape == exact.shape and ours.dtype == dtype and torch.isfinite(ours).all()
    assert rel(ours, exact) <= BUDGET * rel(torchs, exact) + FLOOR[dtype], (rel(ours, exact), rel(torchs, exact))


@pytest.mark.kernel
@needs_triton
def test_geglu_linear_runs_the_two_steps_where_the_gemm_does_not_apply(monkeypatch):
    """float32 (a Triton GEMM would run in TF32), fewer rows than GEMM_MIN_ROWS (cuBLAS measured faster there) and
    FUSED_GEMM = 0 (the A/B's switch) take PyTorch's GEMM and the gate kernel: their result, to the bit."""
    g = torch.Generator(KDEV).manual_seed(1)
    for dtype, rows, fused in ((torch.float32, 1, 1), (torch.float16, 1, 0), (torch.float16, 49, 1)):
        monkeypatch.setattr(geglu_kernel, "FUSED_GEMM", fused)
        monkeypatch.setattr(geglu_kernel, "GEMM_MIN_ROWS", rows)
        x = torch.randn(2, 24, 64, generator=g, device=KDEV).to(dtype)  # 48 rows
        weight, b = torch.randn(128, 64, generator=g, device=KDEV).to(dtype), torch.randn(128, generator=g, device=KDEV).to(dtype)
        assert torch.equal(geglu_kernel.geglu_linear(x, weight, b), geglu_kernel.geglu(F.linear(x, weight, b)))


ATTENTION_SHAPES = [gpu_size(2, 4096, 0, 8, 40), gpu_size(2, 1024, 77, 20, 64), gpu_size(2, 256, 0, 8, 160),
                    gpu_size(1, 4096, 0, 10, 64), (2, 100, 77, 2, 40), (1, 130, 0, 2, 64), (1, 64, 200, 1, 80)]


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n,m,heads,d", ATTENTION_SHAPES)  # m = 0: self-attention, q, k, v views of one tensor
def test_the_attention_kernel_is_as_accurate_as_sdpa(b, n, m, heads, d, dtype, monkeypatch):
    """At every shape, the many-key ones too (MAX_KEYS lifted): the kernel must be right wherever it is used."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bfloat16 tiles wrongly in tl.dot; bfloat16 runs on the GPU")
    launched = CountedLaunches(attention_kernel.attention_kernel)
    monkeypatch.setattr(attention_kernel, "attention_kernel", launched)
    g = torch.Generator(KDEV).manual_seed(n + m + d)
    inner = heads * d
    if m == 0:
        q, k, v = (torch.randn(b, n, 3 * inner, generator=g, device=KDEV) * 2).to(dtype).chunk(3, dim=-1)
    else:
        q = (torch.randn(b, n, inner, generator=g, device=KDEV) * 2).to(dtype)
        k, v = torch.randn(b, m, 2 * inner, generator=g, device=KDEV).to(dtype).chunk(2, dim=-1)
    exact = attention_kernel.reference(q.double(), k.double(), v.double(), heads)
    ours = attention_kernel.attention(q, k, v, heads, max_keys=1 << 30)
    torchs = attention_kernel.reference(q, k, v, heads)
    assert launched.calls == 1, "the kernel did not run"
    assert ours.shape == exact.shape and ours.dtype == dtype and ours.is_contiguous()
    assert rel(ours, exact) <= BUDGET * rel(torchs, exact) + FLOOR[dtype], (rel(ours, exact), rel(torchs, exact))


@pytest.mark.kernel
@needs_triton
def test_attention_over_many_keys_or_in_float32_is_sdpa(monkeypatch):
    launched = CountedLaunches(attention_kernel.attention_kernel)
    monkeypatch.setattr(attention_kernel, "attention_kernel", launched)
    g = torch.Generator(KDEV).manual_seed(0)
    q = torch.randn(1, 40, 80, generator=g, device=KDEV)
    for m, dtype in ((attention_kernel.MAX_KEYS + 1, torch.float16), (77, torch.float32)):
        k, v = torch.randn(2, 1, m, 80, generator=g, device=KDEV).to(dtype)
        assert torch.equal(attention_kernel.attention(q.to(dtype), k, v, 2),
                           attention_kernel.reference(q.to(dtype), k, v, 2))
    assert launched.calls == 0
    k, v = torch.randn(2, 1, attention_kernel.MAX_KEYS, 80, generator=g, device=KDEV).half()
    attention_kernel.attention(q.half(), k, v, 2)
    assert launched.calls == 1


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,bias", [((2, 8, 3, 5), True), ((1, 40, 4, 4), False), ((2, 3, 2, 3), True),
                                        gpu_size((2, 640, 32, 32), True)])
def test_interleave_phases_kernel_is_the_pytorch_twin(shape, bias, dtype):
    """The sub-pixel conv's interleave (and bias add): a copy and one rounded add, so the kernel is its twin to
    the bit, channels last out."""
    if INTERPRET and dtype == torch.bfloat16 and bias:
        pytest.skip("Triton's interpreter converts to bfloat16 without rounding to nearest as the GPU does "
                    "(sums one ulp apart)")
    b, c, h, w = shape
    g = torch.Generator(KDEV).manual_seed(0)
    p = torch.randn(b, 4 * c, h + 1, w + 1, generator=g, device=KDEV).to(dtype)
    p = p.contiguous(memory_format=torch.channels_last)
    conv_bias = torch.randn(c, generator=g, device=KDEV).to(dtype) if bias else None
    ours = shuffle_kernel.interleave_phases(p, conv_bias)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, shuffle_kernel.reference(p, conv_bias))


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c_out,c_in", [(8, 3), (40, 16), gpu_size(1280, 1280)])
def test_phase_weight_kernel_is_the_pytorch_twin(c_out, c_in, dtype):
    """The sub-pixel conv's phase kernels, made in one pass: sums of at most four taps in float32, rounded once,
    so to the bit in float16 and bfloat16 (no tap of these weights is 2**13 times another) and to float32's
    rounding in float32, where the sums' order differs."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter converts to bfloat16 without rounding to nearest as the GPU does")
    g = torch.Generator(KDEV).manual_seed(0)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, device=KDEV).to(dtype).contiguous(memory_format=torch.channels_last)
    ours, twin = shuffle_kernel.phase_weight(w), shuffle_kernel.phase_weight_reference(w)
    assert ours.shape == (4 * c_out, c_in, 2, 2) and ours.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, twin, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(ours, twin)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape_a,c_b", [((2, 64, 3, 5), 40), ((1, 128, 4, 4), 128), ((2, 40, 3, 3), 64),
                                         gpu_size((2, 640, 64, 64), 320)])
def test_the_skip_concatenation_kernel_is_torch_cat(shape_a, c_b, dtype, monkeypatch):
    """A copy, so torch.cat's result to the bit, channels last; the kernel runs where the first map's channels are a
    multiple of its tile (a launch counter says so), torch.cat elsewhere."""
    launched = CountedLaunches(concat_kernel.concat_kernel)
    monkeypatch.setattr(concat_kernel, "concat_kernel", launched)
    g = torch.Generator(KDEV).manual_seed(0)
    n, c_a, h, w = shape_a
    a = torch.randn(n, c_a, h, w, generator=g, device=KDEV).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(n, c_b, h, w, generator=g, device=KDEV).to(dtype).contiguous(memory_format=torch.channels_last)
    ours = concat_kernel.cat_channels(a, b)
    assert torch.equal(ours, torch.cat([a, b], dim=1)) and ours.is_contiguous(memory_format=torch.channels_last)
    assert launched.calls == (c_a % concat_kernel.BLOCK_C == 0)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0), (256, True, 0), (320, False, 1), (7, False, 1)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float16, torch.float64])
def test_the_timestep_features_kernel_is_the_reference(dim, flip, shift, dtype, monkeypatch):
    """The sinusoids in one launch: the reference's frequencies, its angles to the bit (same roundings), so only
    sin and cos of one float32 angle may differ (by an ulp or so under the interpreter's numpy); the layout (flip,
    an odd size's zero) exact. SD's UNets take (320, flip, shift 0); SDXL's size conditions 256."""
    from pare.fast.embeddings import FastTimesteps
    from pare.models.embeddings import Timesteps

    launched = CountedLaunches(timestep_kernel.sinusoids_kernel)
    monkeypatch.setattr(timestep_kernel, "sinusoids_kernel", launched)
    t = torch.tensor([999, 500, 1, 0], device=KDEV).to(dtype)
    if dtype.is_floating_point:
        t = t - 0.37  # fractional, as the Karras-style samplers' timesteps
    reference = Timesteps(dim, flip, shift)
    fast = copy.deepcopy(reference)
    fast.__class__ = FastTimesteps
    for ts in (t, t[:1].expand(3)):  # one per sample; one broadcast over the batch (stride 0), as the UNet has it
        expected = reference(ts)
        ours = fast(ts)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert launched.calls == 2
    if dim % 2:
        assert torch.equal(ours[:, -1], torch.zeros_like(ours[:, -1]))  # an odd size's zero feature


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("b,side,layouts", [(1, 64, ("channels_last", "contiguous")), (2, 8, ("contiguous", "channels_last")),
                                            (1, 5, ("contiguous", "contiguous"))])
@pytest.mark.parametrize("sampler", ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                     "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler/heun",
                                     "DPMSolverMultistepScheduler/sde-dpmsolver++",
                                     "DPMSolverMultistepScheduler/sde-dpmsolver++/heun", "DPMSolverMultistepScheduler/3",
                                     "DPMSolverMultistepScheduler/sde-dpmsolver++/3",
                                     "UniPCMultistepScheduler", "UniPCMultistepScheduler/bh1", "UniPCMultistepScheduler/3",
                                     "DEISMultistepScheduler", "DEISMultistepScheduler/3"])
def test_the_guided_step_kernel_is_nearer_float64_than_the_reference_ops(b, side, layouts, prediction_type, dtype,
                                                                          sampler, monkeypatch):
    """Guidance, DDIM's step (eta 0), Euler's (no churn), Euler ancestral's (its noise given), DPM-Solver++'s (2M,
    midpoint or heun, or 3M: first order at the first and last steps, second or third order between) or UniPC's
    (bh2 or bh1: the predictor alone at the first step; then the corrector of order 2 before a predictor of order 2,
    and of order 1; or at third order the corrector of order 3 before a predictor of order 3, then orders 2 and 1)
    or DEIS's (orders 1, then 2 or 3, its eps history) and the next UNet input in one launch: the PyTorch twin's values
    (within an ulp of the dtype and float32's rounding of the terms), no further from float64 than guidance and the
    scheduler's `step` run in the dtype (the reference loop's ops; bounded as the parity suite bounds a block), at
    every stride of the UNet's output (channels last) and of the latents; the next input is the stepped latents
    twice, scaled as the next step's `scale_model_input` scales them; DPM-Solver's kept x_0 prediction is as near
    float64 as the one its `step` keeps, and UniPC's corrected sample as near as its `last_sample`. The coefficients'
    algebra: float64."""
    import copy as copying

    from parity_tests.tiny_components import SD_SCHEDULER
    from pare.fast.denoise import step_coefficients
    from pare.fast.kernels import guided_step as step_kernel
    from pare.schedulers import SCHEDULERS

    launched = CountedLaunches(step_kernel.guided_step_kernel)
    monkeypatch.setattr(step_kernel, "guided_step_kernel", launched)
    name, *options = sampler.split("/")  # a solver_type, an SDE algorithm_type, or a solver_order
    extra = {("algorithm_type" if o.startswith("sde") else "solver_order" if o.isdigit() else "solver_type"):
             int(o) if o.isdigit() else o for o in options}
    sde = extra.get("algorithm_type", "").startswith("sde")
    s, w = SCHEDULERS[name].from_config(SD_SCHEDULER, prediction_type=prediction_type, **extra), 7.5  # SD's, no clipping
    s.set_timesteps(50)
    multistep = hasattr(s, "model_outputs")
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2 * b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)
    x = torch.randn(b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)
    m1 = torch.randn(b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)  # a previous step's x_0 prediction
    m2 = torch.randn(b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)  # the one before
    m3 = torch.randn(b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)  # and before that (UniPC's corrector)
    last = torch.randn(b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)  # UniPC's sample a step ago
    z = torch.randn(b, 4, side, side, generator=g, dtype=torch.float64).to(KDEV)  # the noise, in every run
    if sde:  # its step draws z in float32, in every run (the float64 one too), as the fused loop hands it to the kernel
        z = z.float().double()
    if name == "EulerAncestralDiscreteScheduler" or sde:  # Euler a's step draws z in the model output's dtype
        monkeypatch.setitem(type(s).step.__globals__, "randn_tensor", lambda shape, gen, device, dtype: z.to(device, dtype))
    fmt = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    eps_d = eps.to(dtype).contiguous(memory_format=fmt[layouts[0]])
    x_d = x.to(dtype).contiguous(memory_format=fmt[layouts[1]])
    m1_d, m2_d, m3_d, last_d = m1.to(dtype), m2.to(dtype), m3.to(dtype), last.to(dtype)  # contiguous: need not be
    # the latents' layout
    unipc, deis = name == "UniPCMultistepScheduler", name == "DEISMultistepScheduler"
    third = extra.get("solver_order") == 3  # DPM-Solver++ 3M, DEIS, UniPC: m2 (UniPC: m3 too) before m1
    orders = []
    for i in (0, 30, len(s.timesteps) - 1):
        t = s.timesteps[i]
        at = copying.deepcopy(s)  # the scheduler at step i (Euler and DPM-Solver keep a step index, and more)
        if hasattr(at, "_step_index"):
            at._step_index, at.is_scale_input_called = i, True
        if multistep:  # its history: m1 (none before the first step)
            at.lower_order_nums = min(i, at.config.solver_order)
            orders.append(at.order_of_step(i, len(s.timesteps)))
        if unipc and i:  # the corrector's: the last step (of order 2 or 3, 2 before the last) started at `last`
            at.this_order = 3 if third and i == 30 else 2
        def history(m, m_, m__):  # the outputs kept, newest last (m1, then m2, m3 before it); none before step 1
            if not i:
                return [None] * (3 if third else 2)
            if unipc:
                return [m__, m_, m] if third else [m_, m]
            return [None, m_, m] if third else [None, m]

        def keep(scheduler, m, m_, m__, sample):  # the history and UniPC's last sample, in a run's dtype
            scheduler.model_outputs = history(m, m_, m__)
            if unipc:
                scheduler.last_sample = sample if i else None
        uncond, text = eps.chunk(2)
        guided = uncond + w * (text - uncond)
        stepper = copying.deepcopy(at)
        if multistep:
            keep(stepper, m1, m2, m3, last)
        if unipc or third or deis:  # their coefficients from float64 levels: in float32, UniPC's phi_2(-h) = (e^-h - 1)
            stepper.sigmas = stepper.sigmas.double()  # / -h - 1 cancels, 3M's (e^-h - 1 + h) / h^2 - 1/2, DEIS's integrals
        exact = stepper.step(guided, t, x).prev_sample  # float64
        exact_next = stepper.scale_model_input(exact, s.timesteps[i + 1]) if i + 1 < len(s.timesteps) else None
        before = copying.deepcopy(at)
        if multistep:
            keep(before, m1, m2, m3, last)
        step = step_coefficients(before, t)
        assert getattr(before, "_step_index", None) == getattr(stepper, "_step_index", None)  # advanced as `step` does
        if multistep:
            assert (step.addend is not None) == (orders[-1] >= 2 or step.correct is not None) and step.convert is not None
            assert before.lower_order_nums == stepper.lower_order_nums
            numbers = lambda sch: {k: v for k, v in plain_state(sch).items() if k != "last_sample"}  # noqa: E731
            assert numbers(before) == numbers(stepper)  # UniPC's last sample: the loop keeps the kernel's
            assert (step.correct is not None) == (unipc and i > 0)
        p_x, p_g = step.convert or (0.0, 1.0)
        m = p_x * x + p_g * guided if step.convert else guided  # DPM-Solver: x_0; else the guided output itself
        m_terms = abs(p_x) * x.abs() + abs(p_g) * (uncond.abs() + w * (text - uncond).abs())  # the terms of m
        start, start_terms = x, x.abs()  # UniPC's corrector replaces the sample the step starts from
        if step.correct is not None:
            q_l, q_1, q_2, q_3, q_m = step.correct[2]
            assert (step.correct[1] is not None) == (q_3 != 0.0) == (third and i == 30)  # m3: UniC of order 3 only
            assert q_2 != 0.0 and step.addend2 is not None  # here UniC is of order 2 or 3 wherever it corrects
            start = q_l * last + q_1 * m1 + q_2 * m2 + q_3 * m3 + q_m * m
            start_terms = (abs(q_l) * last.abs() + abs(q_1) * m1.abs() + abs(q_2) * m2.abs() + abs(q_3) * m3.abs()
                           + abs(q_m) * m_terms)
            torch.testing.assert_close(start, stepper.last_sample, rtol=1e-6, atol=1e-6 * float(start_terms.max()))
        terms = abs(step.c_x) * start_terms + abs(step.c_m) * m_terms
        assert step.draws == (name == "EulerAncestralDiscreteScheduler" or sde)
        prev = m1 if step.addend is not None else None  # the multistep solvers' m1
        prev2 = m2 if step.addend2 is not None else None  # and the third order's (and UniC's) m2
        assert (prev2 is not None) == (multistep and (orders[-1] == 3 or step.correct is not None))
        if prev is not None:
            terms = terms + abs(step.c_add) * prev.abs()
        if prev2 is not None:
            terms = terms + abs(step.c_add2) * prev2.abs()
        if step.draws:  # Euler a's and the SDE's noise
            terms = terms + abs(step.c_noise) * z.abs()
        scale = float(terms.max())
        algebra = (step.c_x * start + step.c_m * m + (step.c_add * prev if prev is not None else 0)
                   + (step.c_add2 * prev2 if prev2 is not None else 0) + (step.c_noise * z if step.draws else 0))
        torch.testing.assert_close(algebra, exact, rtol=1e-6, atol=1e-5 + 1e-6 * scale)  # float32 sigmas there
        if multistep:
            torch.testing.assert_close(m, stepper.model_outputs[-1], rtol=1e-6, atol=1e-6 * float(m.abs().max()))
        if exact_next is not None:
            torch.testing.assert_close(step.next_scale * exact, exact_next, rtol=1e-6, atol=1e-6)
        prev_d = m1_d if step.addend is not None else None
        noise_d = z.to(step.noise_dtype or dtype) if step.draws else None
        correct = None
        if step.correct is not None:  # in the dtype
            correct = (last_d, m3_d if step.correct[1] is not None else None, step.correct[2])
        kw = {"convert": step.convert, "addend": prev_d, "c_add": step.c_add, "correct": correct, "noise": noise_d,
              "c_noise": step.c_noise, "addend2": m2_d if prev2 is not None else None, "c_add2": step.c_add2}
        ours, stacked, kept, corrected = step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m,
                                                                 next_scale=step.next_scale, **kw)
        assert (corrected is not None) == (correct is not None)
        assert ours.dtype == dtype and ours.stride() == x_d.stride() and stacked.is_contiguous()
        assert (kept is not None) == multistep
        assert torch.equal(stacked[:b], stacked[b:])
        if step.next_scale == 1.0:  # DDIM's and DPM-Solver's, and the last step's
            assert torch.equal(stacked[:b], ours)
        else:  # the stored latents scaled in float32, rounded once (an ulp apart where Triton and PyTorch round apart)
            scaled = (ours.float() * step.next_scale).to(dtype)
            torch.testing.assert_close(stacked[:b], scaled, rtol=torch.finfo(dtype).eps, atol=0)
        u, c = eps_d.chunk(2)
        reference = copying.deepcopy(at)  # the reference loop's ops, in dtype
        if multistep:
            keep(reference, m1_d, m2_d, m3_d, last_d)
        theirs = reference.step(u + w * (c - u), t, x_d).prev_sample
        assert rel(ours, exact) <= BUDGET * rel(theirs, exact) + FLOOR[dtype], int(t)
        if multistep:
            kept_exact = stepper.model_outputs[-1]
            assert kept.dtype == dtype and kept.shape == x_d.shape
            assert rel(kept, kept_exact) <= BUDGET * rel(reference.model_outputs[-1], kept_exact) + FLOOR[dtype], int(t)
        if corrected is not None:
            last_exact = stepper.last_sample
            assert rel(corrected, last_exact) <= BUDGET * rel(reference.last_sample, last_exact) + FLOOR[dtype], int(t)
        monkeypatch.setattr(step_kernel, "TRITON_STEP", 0)
        twin, none, twin_kept, twin_corrected = step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m,
                                                                        next_input=False, **kw)
        _, twin_stacked, _, _ = step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, next_scale=step.next_scale,
                                                        **kw)
        monkeypatch.setattr(step_kernel, "TRITON_STEP", 1)
        assert none is None
        # float32 arithmetic on terms up to `scale` (an FMA here, not there), then one rounding to the dtype
        ulp32, ulp = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
        spread = 0.0  # UniPC's: the step starts from x_c as stored, which the twins may round an ulp apart
        if corrected is not None:
            c_terms = float(start_terms.max())
            torch.testing.assert_close(corrected, twin_corrected, rtol=ulp, atol=ulp + 4 * ulp32 * c_terms)
            spread = abs(step.c_x) * (ulp * c_terms + ulp + 4 * ulp32 * c_terms)
        torch.testing.assert_close(ours, twin, rtol=ulp, atol=ulp + 4 * ulp32 * scale + spread)
        torch.testing.assert_close(stacked, twin_stacked, rtol=2 * ulp, atol=2 * (ulp + 4 * ulp32 * scale + spread))
        if multistep:
            torch.testing.assert_close(kept, twin_kept, rtol=ulp, atol=ulp + 4 * ulp32 * float(m_terms.max()))
    assert launched.calls == 3
    if multistep:
        # the first step has no history; the last (final sigma 0; DEIS's, at 50 steps, no lower_order_final) is first order
        assert orders == [1, 3 if third else 2, (3 if third else 2) if deis else 1]
    final, none, _, _ = step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, next_input=False, **kw)  # no next input
    assert none is None and torch.equal(final, ours) and launched.calls == 4
    with pytest.raises(ValueError, match=r"a \(2B, C, h, w\) UNet output"):
        step_kernel.guided_step(eps_d[:b], x_d, w, step.c_x, step.c_m)
    with pytest.raises(ValueError, match=r"addend \(.*\) is not of the sample's shape"):
        step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, addend=m1_d[:, :, :, 0])
    with pytest.raises(ValueError, match="a second addend needs the first"):
        step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, addend2=m2_d)
    with pytest.raises(ValueError, match="a correction needs convert, the addend m1"):
        step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, correct=(last_d, None, (1.0, 0.0, 0.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="addend2 where q_2 != 0, and m3 exactly where q_3 != 0"):  # m3, no q_3
        step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, convert=(1.0, 1.0), addend=m1_d,
                                correct=(last_d, m3_d, (1.0, 1.0, 0.0, 0.0, 1.0)))


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "channels_last")])
def test_the_guided_step_kernel_takes_plms_steps_nearer_float64_than_the_reference_ops(layouts, prediction_type, dtype,
                                                                                     monkeypatch):
    """PLMS (PNDM with skip_prk_steps) in one launch, at every branch of `step_plms`: the first call's Euler step (its
    sample kept), the second's redo of it from that sample with (m + m1) / 2, Adams-Bashforth 2 and 3, then 4 (over
    m1, m2, m3, the kernel's third addend), in the middle of the schedule and at its last step. As for the other
    samplers: the coefficients' algebra is the float64 step, the scheduler's state is advanced as its `step` advances
    it, the stepped latents and the kept output are no further from float64 than the reference's ops in the dtype,
    and the PyTorch twin gives the kernel's values within float32's rounding of the terms."""
    import copy as copying

    from parity_tests.tiny_components import SD_SCHEDULER
    from pare.fast.denoise import step_coefficients
    from pare.fast.kernels import guided_step as step_kernel
    from pare.schedulers import PNDMScheduler

    launched = CountedLaunches(step_kernel.guided_step_kernel)
    monkeypatch.setattr(step_kernel, "guided_step_kernel", launched)
    s, w = PNDMScheduler.from_config(SD_SCHEDULER, skip_prk_steps=True, prediction_type=prediction_type), 7.5
    s.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(KDEV)  # noqa: E731
    eps, x, start = draw(4, 4, 16, 16), draw(2, 4, 16, 16), draw(2, 4, 16, 16)  # start: the first call's sample
    past = [draw(2, 4, 16, 16) for _ in range(4)]  # outputs kept before, oldest first
    fmt = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    eps_d = eps.to(dtype).contiguous(memory_format=fmt[layouts[0]])
    x_d, start_d = (t.to(dtype).contiguous(memory_format=fmt[layouts[1]]) for t in (x, start))
    past_d = [t.to(dtype) for t in past]
    counters = (0, 1, 2, 3, 4, 5, 30, len(s.timesteps) - 1)
    for counter in counters:
        t = s.timesteps[counter]

        def at(ets, sample):  # the scheduler at `counter`, its ets (newest last) and kept sample in a run's dtype
            a = copying.deepcopy(s)
            held = 0 if counter == 0 else 1 if counter <= 2 else min(counter - 1, 4)  # the second call keeps none
            a.counter, a.ets = counter, ets[len(ets) - held:]
            a.cur_sample = sample if counter == 1 else None
            return a
        uncond, text = eps.chunk(2)
        guided = uncond + w * (text - uncond)
        stepper = at(past, start)
        exact = stepper.step(guided, t, x).prev_sample  # float64
        before = at(past, start)
        step = step_coefficients(before, t)
        numbers = lambda sch: {k: v for k, v in plain_state(sch).items() if k != "cur_sample"}  # noqa: E731
        assert numbers(before) == numbers(stepper)  # its counter moved on (the loop keeps the first call's sample)
        assert before.cur_sample is None  # dropped at the second call; at the first, the loop sets it
        assert (stepper.cur_sample is None) == (counter != 0)
        assert (step.base is not None) == (counter == 1) and (step.convert is None) == (counter == 1)
        assert step.keeps_sample == ("cur_sample" if counter == 0 else None)
        order = 1 if counter == 0 else 2 if counter == 1 else min(counter, 4)  # the outputs summed
        assert [a is not None for a in (step.addend, step.addend2, step.addend3)] == [order > j for j in (1, 2, 3)]
        base, base_d = (start, start_d) if counter == 1 else (x, x_d)
        ms, ms_d = past[::-1][:order - 1], past_d[::-1][:order - 1]  # m1, m2, m3: newest first
        cs = (step.c_add, step.c_add2, step.c_add3)
        algebra = step.c_x * base + step.c_m * guided + sum(c * m for c, m in zip(cs, ms))
        scale = float((abs(step.c_x) * base.abs() + abs(step.c_m) * (uncond.abs() + w * (text - uncond).abs())
                       + sum(abs(c) * m.abs() for c, m in zip(cs, ms))).max())
        torch.testing.assert_close(algebra, exact, rtol=1e-6, atol=1e-5 + 1e-6 * scale)  # float32 alpha_bar there
        if counter != 1:  # the raw output joins its history
            torch.testing.assert_close(stepper.ets[-1], guided, rtol=0, atol=0)
        kw = dict(zip(("addend", "addend2", "addend3"), ms_d)) | dict(zip(("c_add", "c_add2", "c_add3"), cs))
        ours, stacked, kept, _ = step_kernel.guided_step(eps_d, base_d, w, step.c_x, step.c_m, convert=step.convert,
                                                         **kw)
        assert ours.dtype == dtype and ours.stride() == base_d.stride() and torch.equal(stacked[:2], ours)
        assert torch.equal(stacked[2:], ours)  # PNDM's scale_model_input is the identity
        reference = at(past_d, start_d)  # the reference loop's ops, in dtype
        theirs = reference.step(eps_d[:2] + w * (eps_d[2:] - eps_d[:2]), t, x_d).prev_sample
        assert rel(ours, exact) <= BUDGET * rel(theirs, exact) + FLOOR[dtype], (counter, int(t))
        if counter != 1:
            assert kept.dtype == dtype
            assert rel(kept, guided) <= BUDGET * rel(reference.ets[-1], guided) + FLOOR[dtype], (counter, int(t))
        else:
            assert kept is None
        monkeypatch.setattr(step_kernel, "TRITON_STEP", 0)
        twin, _, twin_kept, _ = step_kernel.guided_step(eps_d, base_d, w, step.c_x, step.c_m, convert=step.convert, **kw)
        monkeypatch.setattr(step_kernel, "TRITON_STEP", 1)
        ulp32, ulp = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
        torch.testing.assert_close(ours, twin, rtol=ulp, atol=ulp + 4 * ulp32 * scale)
        if kept is not None:  # an ulp apart where float32's rounding of the guidance's terms differs
            m_terms = float((uncond.abs() + w * (text - uncond).abs()).max())
            torch.testing.assert_close(kept, twin_kept, rtol=ulp, atol=ulp + 4 * ulp32 * m_terms)
    assert launched.calls == len(counters)
    with pytest.raises(ValueError, match="a third addend needs the second"):
        step_kernel.guided_step(eps_d, x_d, w, 1.0, 1.0, addend=past_d[0], addend3=past_d[1])
    with pytest.raises(ValueError, match="and no correction"):
        step_kernel.guided_step(eps_d, x_d, w, 1.0, 1.0, convert=(1.0, 1.0), addend=past_d[0], addend2=past_d[1],
                                addend3=past_d[2], correct=(x_d, None, (1.0, 1.0, 1.0, 0.0, 1.0)))


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_guided_step_kernel_takes_lms_steps_nearer_float64_than_the_reference_ops(prediction_type, dtype,
                                                                                    monkeypatch):
    """LMS (order 4, its pipelines' default) in one launch at orders 1 to 4 and with its history trimmed to the last
    three derivatives, in the middle of the schedule and at its last step: the algebra is the float64 step, the
    scheduler's step index is advanced as its `step` advances it, the stepped latents and the kept derivative are no
    further from float64 than the reference's ops in the dtype, the next input is the stepped latents scaled as its
    `scale_model_input` scales them, and the PyTorch twin gives the kernel's values within float32's rounding."""
    import copy as copying

    from parity_tests.tiny_components import SD_SCHEDULER
    from pare.fast.denoise import step_coefficients
    from pare.fast.kernels import guided_step as step_kernel
    from pare.schedulers import LMSDiscreteScheduler

    s, w = LMSDiscreteScheduler.from_config(SD_SCHEDULER, prediction_type=prediction_type), 7.5
    s.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(KDEV)  # noqa: E731
    eps, x = draw(4, 4, 16, 16), draw(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    past = [draw(2, 4, 16, 16) for _ in range(4)]  # derivatives kept before, oldest first
    eps_d, x_d, past_d = eps.to(dtype), x.to(dtype), [t.to(dtype) for t in past]
    uncond, text = eps.chunk(2)
    guided = uncond + w * (text - uncond)
    for i in (0, 1, 2, 3, 4, 30, len(s.timesteps) - 1):
        t = s.timesteps[i]

        def at(ds):  # the scheduler at step i with its derivatives (min(i, 4) of them), in a run's dtype
            a = copying.deepcopy(s)
            a._step_index, a.is_scale_input_called, a.derivatives = i, True, ds[len(ds) - min(i, 4):]
            return a
        stepper = at(past)
        stepper.sigmas = stepper.sigmas.double()  # v's 1 - 1 / (sigma^2 + 1) cancels at small sigma in float32
        exact = stepper.step(guided, t, x).prev_sample  # float64
        before = at(past)
        step = step_coefficients(before, t)
        assert before.step_index == stepper.step_index == i + 1
        terms = min(i + 1, 4)
        assert [a is not None for a in (step.addend, step.addend2, step.addend3)] == [terms > j for j in (1, 2, 3)]
        ms, ms_d = past[::-1][:terms - 1], past_d[::-1][:terms - 1]  # d_{i-1}, d_{i-2}, d_{i-3}
        cs = (step.c_add, step.c_add2, step.c_add3)
        p_x, p_g = step.convert
        d = p_x * x + p_g * guided
        torch.testing.assert_close(d, stepper.derivatives[-1], rtol=1e-6, atol=1e-6)
        algebra = step.c_x * x + step.c_m * d + sum(c * m for c, m in zip(cs, ms))
        scale = float((x.abs() + abs(step.c_m) * d.abs() + sum(abs(c) * m.abs() for c, m in zip(cs, ms))).max())
        torch.testing.assert_close(algebra, exact, rtol=1e-6, atol=1e-6 * scale)
        if i + 1 < len(s.timesteps):
            torch.testing.assert_close(step.next_scale * exact, stepper.scale_model_input(exact, s.timesteps[i + 1]),
                                       rtol=1e-6, atol=1e-6)
        kw = dict(zip(("addend", "addend2", "addend3"), ms_d)) | dict(zip(("c_add", "c_add2", "c_add3"), cs))
        ours, stacked, kept, _ = step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, next_scale=step.next_scale,
                                                         convert=step.convert, **kw)
        assert ours.dtype == dtype and ours.stride() == x_d.stride() and torch.equal(stacked[:2], stacked[2:])
        reference = at(past_d)  # the reference loop's ops, in dtype
        theirs = reference.step(eps_d[:2] + w * (eps_d[2:] - eps_d[:2]), t, x_d).prev_sample
        assert rel(ours, exact) <= BUDGET * rel(theirs, exact) + FLOOR[dtype], i
        assert rel(kept, d) <= BUDGET * rel(reference.derivatives[-1], d) + FLOOR[dtype], i
        monkeypatch.setattr(step_kernel, "TRITON_STEP", 0)
        twin, _, twin_kept, _ = step_kernel.guided_step(eps_d, x_d, w, step.c_x, step.c_m, convert=step.convert, **kw)
        monkeypatch.setattr(step_kernel, "TRITON_STEP", 1)
        ulp32, ulp = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
        torch.testing.assert_close(ours, twin, rtol=ulp, atol=ulp + 4 * ulp32 * scale)
        m_terms = float((abs(p_x) * x.abs() + abs(p_g) * (uncond.abs() + w * (text - uncond).abs())).max())
        torch.testing.assert_close(kept, twin_kept, rtol=ulp, atol=ulp + 4 * ulp32 * m_terms)


@pytest.mark.kernel
@needs_triton
def test_float64_runs_the_pytorch_twins_not_the_float32_kernels():
    """The kernels compute in float32: a float64 tensor must not lose its precision to them."""
    g = torch.Generator(KDEV).manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g, device=KDEV, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(64, generator=g, device=KDEV, dtype=torch.float64) for _ in range(2))
    assert torch.equal(gn_kernel.group_norm(x, 8, w, b, 1e-6, silu=True), gn_kernel.reference(x, 8, w, b, 1e-6, silu=True))
    tokens = x.flatten(2).transpose(1, 2).contiguous()  # (2, 64 tokens, 64 channels)
    h, y = ln_kernel.layer_norm(tokens, w, b, 1e-5, residual=tokens)
    torch.testing.assert_close(y, ln_kernel.reference(tokens, w, b, 1e-5, tokens)[1], rtol=0, atol=0)
    assert torch.equal(geglu_kernel.geglu(tokens), geglu_kernel.reference(tokens))


# --- GPU tier: CUDA graphs ---------------------------------------------------------------------------

@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels,side", [(640, 32), (1280, 16), (256, 256)])
def test_the_sub_pixel_upsampler_is_as_accurate_as_the_reference(channels, side, dtype, monkeypatch):
    """Its phase kernels round summed taps once more than the reference's weights: at the SD UNets' and VAEs'
    upsampler shapes it stays within the fast path's budget against float64."""
    monkeypatch.setattr(fast_resampling, "PHASE_MIN_PIXELS", 0)  # 16 x 16 (SD1.5's first upsampler) runs it too
    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = Upsample2D(channels, use_conv=True).to(dtype).to(memory_format=torch.channels_last)
        x = torch.randn(2, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    fast = copy.deepcopy(reference)
    fast.__class__ = fast_resampling.FastUpsample2D
    assert fast.sub_pixel(x, None)
    exact = copy.deepcopy(reference).double()(x.double())
    assert rel(fast(x), exact) <= BUDGET * rel(reference(x), exact) + FLOOR[dtype]


@pytest.mark.cuda
@torch.no_grad()
def test_graphed_unet_replays_what_eager_computes_and_recaptures_on_change():
    from pare.fast.unet import GraphedUNet2DConditionModel

    ours, _ = unet_pair(TINY_SDXL_UNET, device="cuda", dtype=torch.float16)
    pare.fast.optimize_model(ours, cuda_graph=True)
    assert isinstance(ours, GraphedUNet2DConditionModel)
    args, kwargs = unet_inputs(TINY_SDXL_UNET, 2, 8, 8, device="cuda")
    args = [a.half() if a.is_floating_point() else a for a in args]
    kwargs = {"added_cond_kwargs": {k: v.half() for k, v in kwargs["added_cond_kwargs"].items()}}
    eager = UNet2DConditionModel.forward(ours, *args, **kwargs)
    for t in (981, 500):  # the timestep is an input of the graph, not a constant in it
        out = ours(args[0], torch.tensor(t, device="cuda"), args[2], **kwargs)
        expected = UNet2DConditionModel.forward(ours, args[0], torch.tensor(t, device="cuda"), args[2], **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(ours._pare_graphs.graphs) == 1
    torch.testing.assert_close(ours(*args, **kwargs), eager, rtol=0, atol=0)
    ours(args[0][:1], args[1], args[2][:1], added_cond_kwargs={k: v[:1] for k, v in kwargs["added_cond_kwargs"].items()})
    assert len(ours._pare_graphs.graphs) == 2  # a new batch size is a new graph
    with pytest.raises(ValueError, match="NaN or inf"):
        ours(args[0], args[1], torch.full_like(args[2], float("nan")), **kwargs)


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cfg_batchs_shared_prefix_is_as_accurate_as_the_whole_batch_and_its_graph_replays_it(dtype):
    """pare/fast/unet.py on the GPU: same_halves (the prefix on one half, where cuDNN and cuBLAS may pick other
    kernels) is no further from float64 than the whole batch run by the fast UNet is (the budget of the kernel
    tests); its CUDA graph replays the eager call to the bit, and is a graph of its own."""
    from pare.fast.unet import FastUNet2DConditionModel

    ours, _ = unet_pair(TINY_SD_UNET, device="cuda")
    exact = copy.deepcopy(ours).double()
    pare.fast.optimize_model(ours.to(dtype), cuda_graph=True)
    (x, t, text), _ = unet_inputs(TINY_SD_UNET, 4, 32, 32, device="cuda")
    x, text = torch.cat([x[:2]] * 2), text  # B = 2: the latents twice, four texts
    want = exact(x.double(), t, text.double())
    x, text = x.to(dtype), text.to(dtype)
    whole = FastUNet2DConditionModel.forward(ours, x, t, text)
    halves = FastUNet2DConditionModel.forward(ours, x, t, text, same_halves=True)
    assert rel(halves, want) <= BUDGET * rel(whole, want) + FLOOR[dtype], (rel(halves, want), rel(whole, want))
    for _ in range(3):  # eager twice (weights seen twice), then capture and replay
        replayed = ours(x, t, text, same_halves=True)
    assert torch.equal(replayed, halves)
    assert torch.equal(ours(x, t, text), whole)
    assert len(ours._pare_graphs.graphs) == 2


@pytest.mark.cuda
@torch.no_grad()
def test_graphed_text_encoders_and_vae_replay_what_eager_computes():
    """In a pipeline on CUDA, the once-per-image modules replay graphs: the same numbers, and hooks still fire."""
    from torch.utils._pytree import tree_leaves

    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin

    ours = pare_twin(build_diffusers_pipeline("tiny-sdxl", device="cuda"), torch.float16)
    ours.enable_fast()
    g = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, 100, (2, 77), device="cuda", generator=g)
    z = torch.randn(1, 4, 8, 8, device="cuda", generator=g, dtype=torch.float16)
    image = torch.randn(1, 3, 64, 64, device="cuda", generator=g, dtype=torch.float16)
    cases = [(ours.text_encoder, ids, {"output_hidden_states": True}), (ours.text_encoder_2, ids, {}),
             (ours.vae.decoder, z, {}), (ours.vae.encoder, image, {})]
    for module, x, kwargs in cases:
        calls = []
        handle = module.register_forward_hook(lambda *a: calls.append(1))
        eager = type(module).forward(module, x, **kwargs)
        outs = [module(x, **kwargs) for _ in range(3)]  # the first captures, the others replay
        assert len(module._pare_graphed.graphs) == 1 and len(calls) == 3
        for out in outs:
            for a, b in zip(tree_leaves(out), tree_leaves(eager), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        handle.remove()
    assert len({m._pare_graphed.pool for m, _, _ in cases}) == 1  # replayed one at a time: one memory pool
    ours.disable_fast()
    assert all("_pare_graphed" not in vars(m) and "_pare_pool" not in vars(m) for m, _, _ in cases)


# (scheduler, config overrides, step keyword arguments, whether its loop replays from one graph)
LOOP_CASES = (
    ("DDIMScheduler", {}, {}, True),
    ("DDIMScheduler", {}, {"eta": 1.0}, True),  # draws noise at every step: from a tape filled ahead (noise.py)
    ("PNDMScheduler", {}, {}, True),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}, True),  # PLMS fused: 5 calls, Euler, its redo, AB 2, 3 and 4
    ("DPMSolverMultistepScheduler", {}, {}, True),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, True),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "lower_order_final": False}, {}, True),  # 3M fused (step 3 of
    # 4 at third order); passed on an H200 2026-12-04
    ("DPMSolverSinglestepScheduler", {}, {}, True),
    ("UniPCMultistepScheduler", {}, {}, True),
    ("UniPCMultistepScheduler", {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, {},
     True),  # 4 steps: UniC 0-1-2-3, UniP 1-2-3-3
    ("DEISMultistepScheduler", {}, {}, True),
    ("EulerDiscreteScheduler", {}, {}, True),
    ("EulerAncestralDiscreteScheduler", {}, {}, True),
    ("HeunDiscreteScheduler", {}, {}, True),
    ("KDPM2DiscreteScheduler", {}, {}, True),
    ("LMSDiscreteScheduler", {}, {}, True),  # its step fused since the sixteenth session (not yet run on a GPU so)
    ("DDPMScheduler", {}, {}, True),  # its step read the schedule from the GPU until 2026-12-03 (passed since, 2026-12-04)
)


def plain_state(scheduler) -> dict:
    """A scheduler's attributes that are plain numbers or strings (its step index, counter, order...)."""
    return {k: v for k, v in vars(scheduler).items() if v is None or isinstance(v, (bool, int, float, str))}


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny-sd", "tiny-sdxl"])
def test_the_loop_graph_replays_what_the_step_by_step_loop_computes(family):
    """The whole loop from one graph (loop.py) against the same loop stepping (denoise.py's: the guided step fused
    where it can be; its UNet from per-step graphs): the same latents to the bit, for every sampler, the stochastic
    ones too (their noise drawn ahead of each replay from the call's generator, noise.py); the scheduler's state after
    a replay is the state after a loop; another guidance scale is another graph, and a callback runs the loop step
    by step; a new prompt replays the same graph, its text projected anew."""
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin
    from pare.schedulers import SCHEDULERS

    ours = pare_twin(build_diffusers_pipeline(family, device="cuda"), torch.float16)
    ours.set_progress_bar_config(disable=True)
    ours.enable_fast()
    graphed = vars(ours)["denoise"]
    stepping = functools.partial(pare.fast.denoise.denoise, ours)  # the loop the graph holds (DDIM's step fused)
    base = ours.scheduler.config
    problems = []

    def run(prompt="a cat", **kwargs):
        return ours(prompt=prompt, num_inference_steps=4, height=64, width=64, output_type="latent",
                    generator=torch.Generator("cuda").manual_seed(0), **kwargs).images

    for name, overrides, call, replayed in LOOP_CASES:
        ours.scheduler = SCHEDULERS[name].from_config(base, **overrides)
        vars(ours)["denoise"] = graphed
        first, second = run(**call), run(**call)  # warm-up, capture and replay; then a replay
        after = plain_state(ours.scheduler)
        entries = list(ours._pare_loop.graphs.values())
        vars(ours)["denoise"] = stepping  # the same loop, step by step
        expected = run(**call)
        stepped = plain_state(ours.scheduler)
        if (entries[-1] is not None) != replayed:
            problems.append(f"{name} {overrides} {call}: replayed {entries[-1] is not None}, expected {replayed}")
        for label, got in (("first", first), ("second", second)):
            if not torch.equal(got, expected):
                problems.append(f"{name} {overrides} {call}: {label} call differs by {(got - expected).abs().max()}")
        if after != stepped:
            problems.append(f"{name}: scheduler state {after} after a replay, {stepped} after a loop")
    assert problems == []

    vars(ours)["denoise"] = graphed
    ours.scheduler = SCHEDULERS["DDIMScheduler"].from_config(base)
    run()
    dog = run(prompt="a dog")  # the graph of "a cat", replayed: its text's K and V, held through the loop, made anew
    vars(ours)["denoise"] = stepping
    assert torch.equal(dog, run(prompt="a dog"))
    vars(ours)["denoise"] = graphed
    count = len(ours._pare_loop.graphs)
    run(guidance_scale=3.0)  # neither pipeline's default (SD 7.5, SDXL 5.0)
    assert len(ours._pare_loop.graphs) == count + 1  # guidance_scale is baked into the graph: a new key
    seen = []
    run(callback_on_step_end=lambda pipe, i, t, tensors: seen.append(i))
    assert seen == [0, 1, 2, 3] and len(ours._pare_loop.graphs) == count + 1


@pytest.mark.cuda
@torch.no_grad()
def test_a_loop_that_reads_the_gpu_runs_step_by_step_with_a_warning(caplog):
    """A scheduler step that reads the GPU back to the host cannot be captured: the warm-up sees it, a warning says
    so, and the loop runs step by step with the right result."""
    from parity_tests.tiny_components import build_diffusers_pipeline
    from pare.parity.checkpoint import pare_twin
    from pare.schedulers import DDIMScheduler

    class Syncing(DDIMScheduler):
        def step(self, model_output, timestep, sample, **kwargs):
            if float(model_output.abs().max()) < 0:  # a host read: not allowed in a capture
                raise AssertionError
            return super().step(model_output, timestep, sample, **kwargs)

    ours = pare_twin(build_diffusers_pipeline("tiny-sd", device="cuda"), torch.float16)
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = Syncing.from_config(ours.scheduler.config)
    ours.enable_fast()
    latents = torch.randn(ours.latent_shape(1, 64, 64), device="cuda", dtype=torch.float16)
    kwargs = dict(prompt="a cat", num_inference_steps=3, height=64, width=64, output_type="latent", latents=latents)
    with caplog.at_level("WARNING", logger="pare.fast.loop"):
        got = [ours(**kwargs).images for _ in range(2)]
    assert list(ours._pare_loop.graphs.values()) == [None]
    assert sum("reads the GPU back" in r.message for r in caplog.records) == 1
    del vars(ours)["denoise"]  # the class's loop, the UNet from its per-step graphs
    expected = ours(**kwargs).images
    assert all(torch.equal(g, expected) for g in got)
