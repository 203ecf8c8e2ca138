"""Single-file checkpoints (Stability's original layout) against diffusers' `from_single_file`.

For each family a seeded diffusers pipeline is written as a diffusers folder (the `config=` of
both libraries) and, through pare's `save_single_file`, as one original-layout file. Then:

- diffusers' own converter reads the file back into exactly the tensors it started from (so the
  file pare writes is the layout diffusers expects), and pare's loader reads the same tensors;
- txt2img runs step by step identically in both libraries (`assert_same_run`: latents after every
  step and the image, end-to-end tolerance, uint8 images);
- family recognition, fp16 and EMA files, `prediction_type=`, and every bad input: one clear
  error that names the file.

Against Stability's original code (ldm's own modules): test_single_file_original.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pare
from pare.configs import (SD15_UNET, SDXL_UNET, TINY_SD2_UNET, TINY_SD_INPAINT_UNET, TINY_SD_UNET,
                          TINY_SDXL_UNET, TINY_TEXT, TINY_VAE)
from pare.parity.checkpoint import SCHEDULER, build_reference_pipeline, pare_twin
from pare.single_file import SingleFileError, detect_family, save_single_file
from pare.single_file.families import FAMILIES, SDXL_REFINER_UNET

from .tiny_components import assert_same_run

diffusers = pytest.importorskip("diffusers")

# SD 2.x's encoder is OpenCLIP (gelu, where OpenAI's CLIP has quick_gelu)
TINY_OPENCLIP_TEXT = {**TINY_TEXT, "hidden_size": 48, "hidden_act": "gelu", "projection_dim": 48}
# diffusers tells SDXL's two encoders apart by width (768 vs 1280), so the tiny ones differ too: 32 + 48.
TINY_SDXL_WIDE_UNET = {**TINY_SDXL_UNET, "cross_attention_dim": 80, "projection_class_embeddings_input_dim": 6 * 8 + 48}
# name: (UNet, VAE, text encoder, second text encoder, scheduler prediction type)
CASES = {
    "sd1": (TINY_SD_UNET, TINY_VAE, TINY_TEXT, None, "epsilon"),
    "sd2-v": (TINY_SD2_UNET, TINY_VAE, TINY_OPENCLIP_TEXT, None, "v_prediction"),
    "sd1-inpaint": (TINY_SD_INPAINT_UNET, TINY_VAE, TINY_TEXT, None, "epsilon"),
    "sdxl": (TINY_SDXL_WIDE_UNET, TINY_VAE, TINY_TEXT, TINY_OPENCLIP_TEXT, "epsilon"),
}


def diffusers_class(case: str):
    return diffusers.StableDiffusionXLPipeline if CASES[case][3] else diffusers.StableDiffusionPipeline


def pare_class(case: str):
    return pare.StableDiffusionXLPipeline if CASES[case][3] else pare.StableDiffusionPipeline


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """case -> (diffusers pipeline, its folder, the single file), made on first use."""
    made = {}

    def make(case: str):
        if case not in made:
            unet, vae, text, text_2, prediction = CASES[case]
            pipe = build_reference_pipeline(diffusers, (unet, vae, text, text_2),
                                            {**SCHEDULER, "prediction_type": prediction}, seed=3)
            root = tmp_path_factory.mktemp(case)
            pipe.save_pretrained(root / "folder", safe_serialization=True)
            path = Path(save_single_file(pare_twin(pipe), root / f"{case}.safetensors"))
            made[case] = (pipe, root / "folder", path)
        return made[case]

    return make


def assert_same_weights(model, reference, name: str) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    ours = {k: v for k, v in ours.items() if not k.endswith("position_ids")}
    theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
    assert sorted(ours) == sorted(theirs), f"{name}: keys differ: {sorted(set(ours) ^ set(theirs))[:10]}"
    unequal = [k for k in ours if not torch.equal(ours[k].float(), theirs[k].float())]
    assert not unequal, f"{name}: {len(unequal)} tensors differ, e.g. {unequal[:5]}"


def model_names(case: str):
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if CASES[case][3] else [])


@pytest.mark.parametrize("case", ["sd1", "sd2-v", "sdxl"])
def test_single_file_pipeline_loads_the_weights_and_runs_like_diffusers(written, case):
    original, folder, path = written(case)
    ours = pare_class(case).from_single_file(path, config=str(folder))
    theirs = diffusers_class(case).from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in model_names(case):
        assert_same_weights(getattr(theirs, name), getattr(original, name), f"diffusers' {name} from {path.name}")
        assert_same_weights(getattr(ours, name), getattr(original, name), f"pare's {name} from {path.name}")
    assert ours.scheduler.config.prediction_type == CASES[case][4]
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert_same_run(ours, theirs, f"{case} single file", prompt="a cat", num_inference_steps=2, height=16, width=16)


def test_inpainting_unet_single_file_matches_diffusers(written):
    original, folder, path = written("sd1-inpaint")
    ours = pare.UNet2DConditionModel.from_single_file(path, config=str(folder), subfolder="unet")
    theirs = diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet",
                                                            local_files_only=True)
    assert ours.config.in_channels == 9
    assert_same_weights(theirs, original.unet, "diffusers' 9-channel UNet")
    assert_same_weights(ours, original.unet, "pare's 9-channel UNet")
    ours_pipe = pare.StableDiffusionPipeline.from_single_file(path, config=str(folder))
    assert_same_weights(ours_pipe.vae, original.vae, "pare's VAE of the inpainting file")


def test_vae_single_file_matches_diffusers(written):
    original, folder, path = written("sd1")
    ours = pare.AutoencoderKL.from_single_file(path, config=str(folder / "vae"))
    theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae",
                                                     local_files_only=True)
    assert_same_weights(theirs, original.vae, "diffusers' VAE")
    assert_same_weights(ours, original.vae, "pare's VAE")


def test_prediction_type_overrides_the_config_folder(written):
    _, folder, path = written("sd2-v")
    pipe = pare.StableDiffusionPipeline.from_single_file(path, config=str(folder), prediction_type="epsilon")
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_round_trip_fp16_file_and_dtype(written, tmp_path):
    original, folder, path = written("sdxl")
    pipe = pare.StableDiffusionXLPipeline.from_single_file(path, config=str(folder))
    half = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    back = pare.StableDiffusionXLPipeline.from_single_file(half, config=str(folder))
    assert back.unet.dtype == torch.float32  # as from_pretrained: float32 unless torch_dtype says otherwise
    for name in model_names("sdxl"):
        a, b = getattr(back, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k].half().float()) for k in b if not k.endswith("position_ids")), name
    as_half = pare.StableDiffusionXLPipeline.from_single_file(half, config=str(folder), torch_dtype=torch.float16)
    assert as_half.unet.dtype == torch.float16 and as_half.text_encoder_2.dtype == torch.float16


def test_ema_weights_are_read_when_asked(written, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, path = written("sd1")
    tensors = load_file(str(path))
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1
           for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    save_file({**tensors, **ema, "model_ema.decay": torch.tensor(0.9999)}, str(tmp_path / "ema.safetensors"))
    main = pare.UNet2DConditionModel.from_single_file(tmp_path / "ema.safetensors", config=str(folder))
    with_ema = pare.UNet2DConditionModel.from_single_file(tmp_path / "ema.safetensors", config=str(folder),
                                                          extract_ema=True)
    name = "model.diffusion_model.out.2.weight"
    assert torch.equal(main.conv_out.weight, tensors[name])
    assert torch.equal(with_ema.conv_out.weight, tensors[name] + 1)


def test_pickle_needs_allow_pickle_and_is_read_weights_only(written, tmp_path):
    from safetensors.torch import load_file

    _, folder, path = written("sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 470000}, ckpt)
    with pytest.raises(SingleFileError, match=r"model\.ckpt is a pickle file.*allow_pickle=True"):
        pare.StableDiffusionPipeline.from_single_file(ckpt, config=str(folder))
    pipe = pare.StableDiffusionPipeline.from_single_file(ckpt, config=str(folder), allow_pickle=True)
    assert torch.equal(pipe.unet.conv_in.weight, load_file(str(path))["model.diffusion_model.input_blocks.0.0.weight"])


def test_truncated_file_is_one_clear_error(written, tmp_path):
    _, folder, path = written("sd1")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SingleFileError, match=r"cut\.safetensors cannot be read as safetensors.*truncated"):
        pare.StableDiffusionPipeline.from_single_file(cut, config=str(folder))


def test_file_of_another_family_is_one_clear_error(written):
    _, sd1_folder, sd1 = written("sd1")
    _, sd2_folder, sd2 = written("sd2-v")
    _, _, sdxl = written("sdxl")
    with pytest.raises(SingleFileError, match=r"sdxl\.safetensors is an SDXL base checkpoint.*StableDiffusionXL"):
        pare.StableDiffusionPipeline.from_single_file(sdxl, config=str(sd1_folder))
    with pytest.raises(SingleFileError, match=r"sd1\.safetensors is an SD 1\.x checkpoint.*StableDiffusionPipeline"):
        pare.StableDiffusionXLPipeline.from_single_file(sd1, config=str(sd1_folder))
    with pytest.raises(SingleFileError, match=r"sd2-v\.safetensors is an SD 2\.x .*cross_attention_dim=32"):
        pare.StableDiffusionPipeline.from_single_file(sd2, config=str(sd1_folder))


def test_missing_misshaped_and_leftover_keys_are_named(written, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, path = written("sd1")
    tensors = load_file(str(path))
    gone = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(SingleFileError, match=rf"(?s)missing\.safetensors.*missing:\n  {gone}"):
        pare.UNet2DConditionModel.from_single_file(tmp_path / "missing.safetensors", config=str(folder))
    extra = "model.diffusion_model.input_blocks.9.0.in_layers.0.weight"
    save_file({**tensors, extra: torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(SingleFileError, match=rf"(?s)extra\.safetensors: 1 keys .*fit no part.*\n  {extra}"):
        pare.StableDiffusionPipeline.from_single_file(tmp_path / "extra.safetensors", config=str(folder))
    shaped = "first_stage_model.decoder.mid.attn_1.q.weight"
    save_file({**tensors, shaped: tensors[shaped][:1]}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(SingleFileError, match=rf"(?s)shape\.safetensors.*wrong shape:\n  {shaped}: file \(1, 16, 1, 1\)"):
        pare.AutoencoderKL.from_single_file(tmp_path / "shape.safetensors", config=str(folder / "vae"))
    # Ignored keys are ignored: schedule buffers, position ids, EMA bookkeeping.
    save_file({**tensors, "alphas_cumprod": torch.ones(1000), "model_ema.num_updates": torch.tensor(1),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]},
              str(tmp_path / "ignored.safetensors"))
    pare.StableDiffusionPipeline.from_single_file(tmp_path / "ignored.safetensors", config=str(folder))


def test_nothing_partly_loaded_when_one_component_fails(written, tmp_path):
    """A broken text encoder fails the call before any model is built (no half-loaded pipeline object exists)."""
    from safetensors.torch import load_file, save_file

    _, folder, path = written("sd2-v")
    tensors = load_file(str(path))
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    save_file({**tensors, key: tensors[key][:-3]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SingleFileError, match=r"(?s)CLIPTextModel from .*bad\.safetensors.*in_proj_weight"):
        pare.StableDiffusionPipeline.from_single_file(tmp_path / "bad.safetensors", config=str(folder))


def test_sd2_openclip_last_layer_and_projection_are_skipped(written, tmp_path):
    """SD 2.x files carry ViT-H's 24th layer and text_projection; diffusers' 23-layer encoder leaves them out."""
    from safetensors.torch import load_file, save_file

    original, folder, path = written("sd2-v")
    tensors = load_file(str(path))
    prefix = "cond_stage_model.model."
    extra = {k.replace("resblocks.2.", "resblocks.3."): v.clone() for k, v in tensors.items()
             if k.startswith(prefix + "transformer.resblocks.2.")}
    extra[prefix + "text_projection"] = torch.zeros(48, 48)
    extra[prefix + "attn_mask"] = torch.zeros(16, 16)
    save_file({**tensors, **extra}, str(tmp_path / "full.safetensors"))
    pipe = pare.StableDiffusionPipeline.from_single_file(tmp_path / "full.safetensors", config=str(folder))
    assert_same_weights(pipe.text_encoder, original.text_encoder, "SD2 text encoder")


def meta(*shape):
    return torch.empty(shape, device="meta")


def official_keys(unet: dict, text_prefixes=()) -> dict:
    """The few tensors recognition reads, at an official config's shapes (meta tensors: no memory)."""
    keys = {"model.diffusion_model.input_blocks.0.0.weight": meta(320, unet["in_channels"], 3, 3),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                meta(640, unet["cross_attention_dim"])}
    if unet.get("addition_embed_type") == "text_time":
        keys["model.diffusion_model.label_emb.0.0.weight"] = meta(1280, unet["projection_class_embeddings_input_dim"])
    keys.update({p + "x": meta(1) for p in text_prefixes})
    return keys


@pytest.mark.parametrize("family, text_prefixes", [
    ("v1", ("cond_stage_model.transformer.",)), ("v1", ()),
    ("v2", ("cond_stage_model.model.",)), ("v2", ()),
    ("inpainting", ("cond_stage_model.transformer.",)), ("inpainting_v2", ("cond_stage_model.model.",)),
    ("xl_base", ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")), ("xl_base", ()),
    ("xl_inpaint", ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")),
    ("xl_refiner", ("conditioner.embedders.0.model.",)), ("xl_refiner", ()),
])
def test_family_is_recognised_from_keys_and_shapes(family, text_prefixes):
    assert detect_family(official_keys(FAMILIES[family].unet, text_prefixes), "f").name == family


def test_keys_that_fit_no_family_are_one_clear_error():
    with pytest.raises(SingleFileError, match=r"(?s)f fits no known family.*cross-attention width=32"):
        detect_family(official_keys({**SD15_UNET, "cross_attention_dim": 32}), "f")
    with pytest.raises(SingleFileError, match=r"f is not a Stable Diffusion checkpoint.*\['encoder'\]"):
        detect_family({"encoder.weight": meta(1)}, "f")
    with pytest.raises(SingleFileError, match="takes 6 input channels"):
        detect_family(official_keys({**SD15_UNET, "in_channels": 6}), "f")


def test_unet_single_file_without_config_uses_the_family_config(tmp_path):
    """No config=: the UNet is built from the family's official config (SDXL refiner here, random weights)."""
    with torch.device("meta"):
        unet = pare.UNet2DConditionModel.from_config(SDXL_REFINER_UNET)
    from pare.single_file.save import original_state_dict
    from pare.single_file.unet_map import UNET_MAP

    names = original_state_dict(unet, "model.diffusion_model.", UNET_MAP, unet.config)
    assert len(names) == len(unet.state_dict())
    assert detect_family(names, "refiner").name == "xl_refiner"
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in names  # up block 0 has no attention: conv at .1
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in names  # up block 1 has: conv at .2
    assert SDXL_UNET["cross_attention_dim"] == 2048


def test_config_may_name_a_family():
    """config="v2" (a family name) means that family's official config, whatever the file's own family."""
    from pare.single_file.loader import component_config

    assert component_config("v2", "unet", None, FAMILIES["v1"], {}) == FAMILIES["v2"].unet
    assert component_config("xl_refiner", "vae", None, None, {}) == FAMILIES["xl_refiner"].vae
    assert component_config(None, "unet", None, FAMILIES["inpainting"], {})["in_channels"] == 9


def test_cli_generate_from_a_single_file_with_loras_matches_the_folder(written, tmp_path, capsys):
    """`pare generate --model file.safetensors --config DIR --lora a:0.5 --lora b` gives the image pare's API gives."""
    import numpy as np
    import PIL.Image
    from safetensors.torch import save_file

    from pare.cli import main

    from .test_lora import kohya_lora, peft_lora

    original, folder, path = written("sd1")
    save_file(peft_lora(original, seed=5), str(tmp_path / "a.safetensors"))
    save_file(kohya_lora(original, seed=6), str(tmp_path / "b.safetensors"))
    # --device cpu: on a GPU machine `pare generate` would run on CUDA, and the API pipe below stays on the CPU.
    args = ["generate", "--prompt", "a cat", "--steps", "2", "--seed", "0", "--height", "16", "--width", "16",
            "--scheduler", "DDIMScheduler", "--device", "cpu"]
    out = tmp_path / "cli.png"
    assert main([*args, "--model", str(path), "--config", str(folder), "--lora", f"{tmp_path / 'a.safetensors'}:0.5",
                 "--lora", str(tmp_path / "b.safetensors"), "--out", str(out)]) == 0
    assert "StableDiffusionPipeline" in capsys.readouterr().out
    pipe = pare.StableDiffusionPipeline.from_single_file(path, config=str(folder))
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    pipe.load_lora_weights(str(tmp_path / "b.safetensors"), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 1.0])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(image))
    with pytest.raises(SystemExit) as info:  # checked before anything loads
        main([*args, "--model", str(path), "--lora", f"{tmp_path / 'missing.safetensors'}:0.5"])
    assert info.value.code == 2 and "missing.safetensors does not exist" in capsys.readouterr().err


def test_sdxl_img2img_from_single_file_matches_diffusers(written):
    original, folder, path = written("sdxl")
    ours = pare.StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=str(folder))
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(folder),
                                                                         local_files_only=True)
    assert_same_weights(ours.unet, theirs.unet, "img2img UNet")
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert_same_run(ours, theirs, "SDXL img2img single file", prompt="a cat", image=image, strength=0.6,
                    num_inference_steps=3)


def config_folder(pipe, folder: Path) -> Path:
    """A diffusers pipeline's configs, tokenizers and scheduler without its weights: what `config=` reads."""
    pipe.save_config(folder)  # model_index.json
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(folder / name)
        elif hasattr(component, "vocab_size") and hasattr(component, "save_pretrained"):  # tokenizers
            component.save_pretrained(folder / name)
        else:  # transformers models: their config.json only
            component.config.save_pretrained(folder / name)
    return folder


@pytest.mark.official
@pytest.mark.cuda
def test_official_sdxl_single_file_matches_diffusers(device, dtype, tmp_path):
    """SDXL base at its official UNet / VAE configs (random weights, 2.6 B UNet parameters) and 1024 x 1024:
    the same file through pare's and diffusers' from_single_file, every weight equal, 2 DDIM steps judged as
    the official pipeline tier (float32: end-to-end tolerance; below: the error budget against float64)."""
    from .tiny_components import assert_official_run, official_pipelines

    twin, original = official_pipelines("sdxl", device, torch.float32)
    path = Path(save_single_file(twin, tmp_path / "sdxl.safetensors"))
    folder = config_folder(original, tmp_path / "config")
    ours = pare.StableDiffusionXLPipeline.from_single_file(path, config=str(folder)).to(device)
    for name in model_names("sdxl"):
        assert_same_weights(getattr(ours, name), getattr(original, name), f"pare's official {name}")
    del twin, original
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder),
                                                                  local_files_only=True).to(device)
    for name in model_names("sdxl"):
        assert_same_weights(getattr(theirs, name), getattr(ours, name), f"diffusers' official {name}")
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    ours.to(dtype)
    assert_official_run(ours, theirs, dtype, prompt="an astronaut", height=1024, width=1024, num_inference_steps=2)


def test_pare_parity_compares_each_librarys_loading_of_a_single_file(written, tmp_path, capsys):
    from pare.cli import main

    _, folder, path = written("sd1")
    out = tmp_path / "report"
    assert main(["parity", "--model", str(path), "--single-file-config", str(folder), "--out", str(out)]) == 0
    data = __import__("json").loads(out.with_suffix(".json").read_text())
    assert "single file" in data["header"]["model"]
    names = [r["name"] for r in data["rows"]]
    assert {r["component"] for r in data["rows"]} == {"unet", "vae"}
    assert "UNet2DConditionModel" in names and "VAEDecode" in names and data["first_failure"] is None
    with pytest.raises(SystemExit, match="is a single checkpoint file: compare its loading with --components unet,vae"):
        main(["parity", "--model", str(path), "--components", "pipeline"])


def test_inpainting_single_file_pipeline_runs_like_diffusers_step_by_step(written):
    from .test_pipeline_inpaint import photo_and_mask

    _, folder, path = written("sd1-inpaint")
    ours = pare.StableDiffusionInpaintPipeline.from_single_file(path, config=str(folder))
    theirs = diffusers.StableDiffusionInpaintPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert ours.unet.config.in_channels == 9
    photo, mask = photo_and_mask()
    assert_same_run(ours, theirs, "inpainting from one file", prompt="a red door", image=photo, mask_image=mask,
                    num_inference_steps=3, strength=0.8)
