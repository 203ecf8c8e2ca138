"""LoRA in pare's pipelines against diffusers + peft: every format, scales 0, 0.5 and 1, fused and unfused.

Each test builds one seeded tiny pipeline in diffusers and pare's twin with its own copies of the
weights (`pare_twin(..., torch.float32)`), writes a random LoRA in one format, loads it into both
and compares whole txt2img runs step by step (`assert_same_run`: latents after every step and the
image, end-to-end tolerance). LoRA formats:

- diffusers / peft keys (`unet.<module>.lora_A.weight`);
- the older diffusers keys (`unet.<module>.lora.down.weight`, `text_encoder.<module>.lora_linear_layer.up.weight`);
- kohya / A1111 (`lora_unet_..._to_q.lora_down.weight` with `.alpha`), with LoCon convs on the
  ResNets; for SDXL with the original LDM block names (`lora_unet_input_blocks_4_1_...`) and both
  text encoders (`lora_te1_`, `lora_te2_`).
"""

from __future__ import annotations

import pytest
import torch

from pare.configs import TINY_SD_UNET, TINY_TEXT, TINY_VAE
from pare.lora.formats import _ldm_name
from pare.parity.checkpoint import SCHEDULER, build_reference_pipeline, pare_twin
from pare.single_file import SingleFileError

from .test_single_file import TINY_OPENCLIP_TEXT, TINY_SDXL_WIDE_UNET
from .tiny_components import assert_same_run

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft", reason="diffusers loads LoRA through peft (the test extra)")

RANK = 4
UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "time_emb_proj")
UNET_CONVS = ("conv1", "conv2", "conv_shortcut")  # LoCon: the ResNets' convolutions
TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def pipelines(sdxl: bool = False, seed: int = 3):
    models = ((TINY_SDXL_WIDE_UNET, TINY_VAE, TINY_TEXT, TINY_OPENCLIP_TEXT) if sdxl
              else (TINY_SD_UNET, TINY_VAE, TINY_TEXT, None))
    theirs = build_reference_pipeline(diffusers, models, SCHEDULER, seed=seed)
    ours = pare_twin(theirs, torch.float32)  # its own copies: peft wraps diffusers' modules in place
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def targets(model, suffixes, conv: bool = False):
    kind = torch.nn.Conv2d if conv else (torch.nn.Linear, torch.nn.Conv2d)
    return [(p, m) for p, m in model.named_modules() if isinstance(m, kind) and p.endswith(suffixes)]


def random_pair(module, g, conv_kernel: bool = False):
    """(down, up) for `module`, large enough to move the image: rank 4, N(0, 0.3^2) entries."""
    if isinstance(module, torch.nn.Conv2d):
        kernel = module.kernel_size if conv_kernel else (1, 1)
        down = torch.randn(RANK, module.in_channels, *kernel, generator=g) * 0.3
        return down, torch.randn(module.out_channels, RANK, 1, 1, generator=g) * 0.3
    return (torch.randn(RANK, module.in_features, generator=g) * 0.3,
            torch.randn(module.out_features, RANK, generator=g) * 0.3)


def text_encoders(pipe):
    return [("text_encoder", pipe.text_encoder)] + (
        [("text_encoder_2", pipe.text_encoder_2)] if getattr(pipe, "text_encoder_2", None) is not None else [])


def peft_lora(pipe, seed: int = 0, old: bool = False) -> dict:
    """diffusers / peft keys (or, `old`, the keys of diffusers before peft) for the attention and text layers."""
    g, sd = torch.Generator().manual_seed(seed), {}
    unet_names = ("lora.down.weight", "lora.up.weight") if old else ("lora_A.weight", "lora_B.weight")
    text_names = ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight") if old else unet_names
    for path, m in targets(pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")):
        sd[f"unet.{path}.{unet_names[0]}"], sd[f"unet.{path}.{unet_names[1]}"] = random_pair(m, g)
    for component, encoder in text_encoders(pipe):
        for path, m in targets(encoder, ("q_proj", "k_proj", "v_proj", "out_proj")):
            path = "text_model." + path.removeprefix("text_model.")
            sd[f"{component}.{path}.{text_names[0]}"], sd[f"{component}.{path}.{text_names[1]}"] = random_pair(m, g)
    return sd


def attn_procs_lora(pipe, seed: int = 0, prefix: str = "unet.") -> dict:
    """The attention-processor keys of diffusers before peft: `<attention>.processor.to_q_lora.down.weight`."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for path, m in targets(pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")):
        attention, proj = (path[:-len(".to_out.0")], "to_out") if path.endswith("to_out.0") else path.rsplit(".", 1)
        down, up = random_pair(m, g)
        sd[f"{prefix}{attention}.processor.{proj}_lora.down.weight"] = down
        sd[f"{prefix}{attention}.processor.{proj}_lora.up.weight"] = up
    return sd


def kohya_lora(pipe, seed: int = 0, ldm_names: bool = False) -> dict:
    """kohya / A1111 keys with alphas; LoCon convs; SDXL: LDM block names and te1 / te2."""
    g, sd = torch.Generator().manual_seed(seed), {}

    def add(name, module, conv_kernel=False):
        down, up = random_pair(module, g, conv_kernel)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        # One alpha for the whole file, as kohya's trainer writes it (network_alpha); alpha / rank = 0.5.
        # (diffusers 0.42.1 drops alphas that differ between modules: its peft alpha_pattern keys name no module.)
        sd[f"{name}.alpha"] = torch.tensor(RANK / 2)

    for path, m in targets(pipe.unet, UNET_LINEARS) + targets(pipe.unet, UNET_CONVS, conv=True):
        name = _ldm_name(pipe.unet, path) if ldm_names else path
        add("lora_unet_" + name.replace(".", "_"), m, conv_kernel=True)
    prefixes = {"text_encoder": "lora_te1_" if ldm_names else "lora_te_", "text_encoder_2": "lora_te2_"}
    for component, encoder in text_encoders(pipe):
        for path, m in targets(encoder, TEXT_LINEARS):
            add(prefixes[component] + ("text_model." + path.removeprefix("text_model.")).replace(".", "_"), m)
    return sd


RUN = dict(prompt="a cat", num_inference_steps=2, height=16, width=16)


def same_run(ours, theirs, name):
    return assert_same_run(ours, theirs, name, **RUN)


def run(pipe):
    from .tiny_components import record_run

    return torch.from_numpy(record_run(pipe, output_type="np", **RUN)[1])


def check_lora_moves_the_image(ours, base_image, name):
    changed = (run(ours) - base_image).abs().max()
    assert changed > 1e-2, f"{name}: the LoRA changes the image by only {changed:.2e}: the test would not see a bug"


# Every scale, unfused and fused, on one format; the other formats unfused at 1 (as loaded) and fused at 0.5.
SCALES = {"peft": (0.0, 0.5), "old-diffusers": (), "attn-procs": (), "kohya": ()}  # and 1: as loaded
FUSED_SCALES = {"peft": (0.0, 0.5, 1.0), "old-diffusers": (0.5,), "attn-procs": (0.5,), "kohya": (0.5,)}


@pytest.mark.parametrize("fmt", list(SCALES))
def test_lora_formats_match_diffusers_at_scales_unfused_and_fused(fmt):
    ours, theirs = pipelines()
    base = run(ours)
    lora = {"peft": peft_lora, "old-diffusers": lambda p: peft_lora(p, old=True), "attn-procs": attn_procs_lora,
            "kohya": kohya_lora}[fmt](theirs)
    ours.load_lora_weights(dict(lora), adapter_name="style")
    theirs.load_lora_weights(dict(lora), adapter_name="style")
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["style"]
    check_lora_moves_the_image(ours, base, fmt)
    weights = {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder")
               for k, v in getattr(ours, name).state_dict().items()}
    same_run(ours, theirs, f"{fmt} LoRA as loaded (weight 1)")
    for scale in SCALES[fmt]:
        ours.set_adapters(["style"], adapter_weights=[scale])
        theirs.set_adapters(["style"], adapter_weights=[scale])
        same_run(ours, theirs, f"{fmt} LoRA unfused at weight {scale}")
    for scale in FUSED_SCALES[fmt]:
        # diffusers' fuse_lora multiplies peft's scaling by lora_scale and leaves it so after unfuse_lora;
        # set_adapters resets it. pare's fuse_lora changes nothing but the weights (see pare/lora/mixin.py).
        for pipe in (ours, theirs):
            pipe.set_adapters(["style"], adapter_weights=[1.0])
        ours.fuse_lora(lora_scale=scale)
        theirs.fuse_lora(lora_scale=scale)
        same_run(ours, theirs, f"{fmt} LoRA fused at lora_scale {scale} (adapter weight 1)")
        ours.unfuse_lora()
        theirs.unfuse_lora()
        unequal = [f"{name}.{k}" for name in ("unet", "text_encoder") for k, v in getattr(ours, name).state_dict().items()
                   if not torch.equal(v, weights[f"{name}.{k}"])]
        assert not unequal, f"unfuse_lora did not restore {unequal[:5]} bit for bit"
    ours.unload_lora_weights()
    assert torch.equal(run(ours), base), "after unload_lora_weights the pipeline must give the image it gave before"


def test_sdxl_kohya_lora_with_ldm_names_and_both_text_encoders_matches_diffusers():
    ours, theirs = pipelines(sdxl=True)
    base = run(ours)
    lora = kohya_lora(theirs, ldm_names=True)
    assert any(k.startswith("lora_unet_input_blocks_") for k in lora) and any(k.startswith("lora_te2_") for k in lora)
    ours.load_lora_weights(dict(lora))
    theirs.load_lora_weights(dict(lora))
    check_lora_moves_the_image(ours, base, "SDXL kohya")
    same_run(ours, theirs, "SDXL kohya LoRA (LDM names, te1 + te2)")
    ours.fuse_lora(lora_scale=0.5)
    theirs.fuse_lora(lora_scale=0.5)
    same_run(ours, theirs, "SDXL kohya LoRA fused at 0.5")


def test_two_adapters_and_fuse_then_unload_match_diffusers(tmp_path):
    from safetensors.torch import save_file

    ours, theirs = pipelines()
    save_file(peft_lora(theirs, seed=1), str(tmp_path / "a.safetensors"))
    save_file(kohya_lora(theirs, seed=2), str(tmp_path / "b.safetensors"))
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(tmp_path / "a.safetensors"))  # default_0
        pipe.load_lora_weights(str(tmp_path / "b.safetensors"))  # default_1, now the only active one
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["default_1"]
    same_run(ours, theirs, "second LoRA active")
    for pipe in (ours, theirs):
        pipe.set_adapters(["default_0", "default_1"], adapter_weights=[0.7, 0.4])
    same_run(ours, theirs, "two LoRAs at 0.7 and 0.4")
    for pipe in (ours, theirs):
        pipe.fuse_lora(lora_scale=0.8)
        pipe.unload_lora_weights()  # the fused weights stay
    same_run(ours, theirs, "two LoRAs fused at 0.8, then unloaded")


def test_lora_for_the_wrong_base_is_one_error_and_loads_nothing(tmp_path):
    from safetensors.torch import save_file

    sd_pipe, _ = pipelines()
    xl_ours, xl_theirs = pipelines(sdxl=True)
    path = tmp_path / "sdxl-lora.safetensors"
    save_file(kohya_lora(xl_theirs, ldm_names=True), str(path))
    with pytest.raises(SingleFileError, match=r"(?s)LoRA in .*sdxl-lora\.safetensors does not fit.*nothing was loaded"
                                              r".*this pipeline has no text_encoder_2"):
        sd_pipe.load_lora_weights(str(path))
    assert sd_pipe.get_list_adapters() == {}
    sd_lora = peft_lora(sd_pipe)
    with pytest.raises(SingleFileError, match=r"(?s)do not fit.*needs"):
        xl_ours.load_lora_weights(sd_lora)
    with pytest.raises(SingleFileError, match=r"(?s)no known LoRA format.*\n  unet\.x\.weight"):
        sd_pipe.load_lora_weights({**sd_lora, "unet.x.weight": torch.zeros(1)})
    key = "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"
    with pytest.raises(SingleFileError, match=r"(?s)modules this pipeline does not have.*down_blocks_7"):
        sd_pipe.load_lora_weights({**sd_lora, key: torch.zeros(RANK, 32)})
    assert sd_pipe.get_list_adapters() == {} and xl_ours.get_list_adapters() == {}
    with pytest.raises(SingleFileError, match="already in use"):
        sd_pipe.load_lora_weights(sd_lora, adapter_name="x")
        sd_pipe.load_lora_weights(sd_lora, adapter_name="x")


def test_attn_procs_keys_without_the_unet_prefix_load_as_with_it():
    """Files of the oldest diffusers carry no `unet.` prefix. diffusers 0.42.1 then loads nothing (a warning);
    pare loads them into the UNet, exactly as the prefixed keys."""
    ours, _ = pipelines()
    ours.load_lora_weights(attn_procs_lora(ours, prefix=""), adapter_name="bare")
    bare = run(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights(attn_procs_lora(ours, prefix="unet."), adapter_name="prefixed")
    assert torch.equal(run(ours), bare)


@pytest.mark.parametrize("fuse", [False, True])
def test_kohya_lora_on_the_fast_path_matches_diffusers(fuse):
    """pipe.enable_fast() with a LoRA on every linear and conv (kohya, LoCon): unfused, the hooked blocks run their
    reference forward; fused, the fast blocks read the fused weights (Q/K/V views of one matrix included)."""
    ours, theirs = pipelines()
    lora = kohya_lora(theirs)
    for pipe in (ours, theirs):
        pipe.load_lora_weights(dict(lora))
    ours.enable_fast()
    if fuse:
        ours.fuse_lora(lora_scale=0.5)
        theirs.fuse_lora(lora_scale=0.5)
    same_run(ours, theirs, f"kohya LoRA on pare's fast path, {'fused at 0.5' if fuse else 'unfused'}")
