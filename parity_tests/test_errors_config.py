"""Config keys, model_index.json and weight files: refused by type and range, naming the file, the key and
the value; and every config diffusers writes or the Hub's official checkpoints carry still loads."""

import json
import shutil

import pytest
import torch
from hypothesis import given
from safetensors.torch import load_file, save_file

import pare
from pare.configs import SD15_UNET, SD21_UNET, SD_VAE, SDXL_UNET, SDXL_VAE, TINY_SD_UNET, TINY_SDXL_UNET, TINY_VAE
from pare.loading import WeightLoadError
from pare.validation import CONFIG_RULES, check_config, check_model_index

from .checkpoints import make_checkpoint
from .strategies import scheduler_configs, vae_configs
from .tiny_components import SD_SCHEDULER, pipeline_folder

WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_tensors(file) -> dict:
    """Copies, not views of the memory-mapped file: the tests overwrite that file."""
    return {k: v.clone() for k, v in load_file(str(file)).items()}


# --- what must keep loading ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SD15_UNET", "SD21_UNET", "SDXL_UNET", "TINY_SD_UNET", "TINY_SDXL_UNET"])
def test_official_and_tiny_unet_configs_pass(name):
    config = {"SD15_UNET": SD15_UNET, "SD21_UNET": SD21_UNET, "SDXL_UNET": SDXL_UNET, "TINY_SD_UNET": TINY_SD_UNET,
              "TINY_SDXL_UNET": TINY_SDXL_UNET}[name]
    check_config(pare.UNet2DConditionModel, pare.UNet2DConditionModel.resolve_config(config), name)


@pytest.mark.parametrize("config", [SD_VAE, SDXL_VAE, TINY_VAE], ids=["sd", "sdxl", "tiny"])
def test_official_and_tiny_vae_configs_pass(config):
    pare.AutoencoderKL.resolve_config(config)


def test_configs_diffusers_writes_pass_validation():
    """diffusers' own config.json files (every key it writes, defaults included) for the tiny pipelines."""
    for family in ("tiny-sd", "tiny-sdxl"):
        root = pipeline_folder(family)
        for name, cls in (("unet", pare.UNet2DConditionModel), ("vae", pare.AutoencoderKL)):
            cls.resolve_config(json.loads((root / name / "config.json").read_text()), name)
        check_model_index(json.loads((root / "model_index.json").read_text()), root / "model_index.json")


@given(scheduler_configs("ddim"))
def test_every_ddim_config_of_the_parity_strategies_passes(config):
    pare.DDIMScheduler.from_config(config)


@given(scheduler_configs("ddpm"))
def test_every_ddpm_config_of_the_parity_strategies_passes(config):
    pare.DDPMScheduler.from_config(config)


@given(vae_configs())
def test_every_vae_config_of_the_parity_strategies_passes(config):
    pare.AutoencoderKL.resolve_config(config)


def test_the_tables_cover_every_key_of_their_classes_init():
    """A key added to a class's __init__ without a rule would go unchecked: the table must grow with it."""
    classes = {"UNet2DConditionModel": pare.UNet2DConditionModel, "AutoencoderKL": pare.AutoencoderKL,
               "DDIMScheduler": pare.DDIMScheduler, "DDPMScheduler": pare.DDPMScheduler}
    checked_by_the_class = {"num_attention_heads", "addition_embed_type", "cross_attention_norm"}
    for name, cls in classes.items():
        missing = set(cls.config_keys()) - set(CONFIG_RULES[name]()) - checked_by_the_class
        assert not missing, f"{name}: no rule for {sorted(missing)}"


# --- what must be refused ------------------------------------------------------------------------


BAD_CONFIGS = [
    ("UNet2DConditionModel", TINY_SD_UNET, "in_channels", "4", "in_channels must be a positive int"),
    ("UNet2DConditionModel", TINY_SD_UNET, "in_channels", True, "which is a bool"),
    ("UNet2DConditionModel", TINY_SD_UNET, "down_block_types", ["DownBlock2D", "AttnDownBlock2D"],
     "names a down block 'AttnDownBlock2D'"),
    ("UNet2DConditionModel", TINY_SD_UNET, "down_block_types", ["DownBlock2D", 2], "entry [1] = 2, which is an int"),
    ("UNet2DConditionModel", TINY_SD_UNET, "norm_eps", -1e-5, "norm_eps must be a finite number in (0, inf)"),
    ("UNet2DConditionModel", TINY_SD_UNET, "act_fn", "tanh", "act_fn must be one of ("),
    ("UNet2DConditionModel", TINY_SD_UNET, "layers_per_block", [1, 1, 1], "has 3 entries, but there are 2 down blocks"),
    ("UNet2DConditionModel", TINY_SD_UNET, "attention_head_dim", 3, "does not divide block_out_channels[0]=32"),
    ("UNet2DConditionModel", TINY_SD_UNET, "conv_in_kernel", 2, "which is even"),
    ("UNet2DConditionModel", TINY_SD_UNET, "sample_size", [8], "sample_size="),
    ("AutoencoderKL", TINY_VAE, "latent_channels", 0, "latent_channels=0, which is out of range"),
    ("AutoencoderKL", TINY_VAE, "scaling_factor", float("nan"), "scaling_factor=nan, which is not finite"),
    ("AutoencoderKL", TINY_VAE, "norm_num_groups", 3, "GroupNorm cannot split"),
    ("AutoencoderKL", TINY_VAE, "down_block_types", ["DownEncoderBlock2D"] * 3, "give one entry per resolution"),
    ("DDIMScheduler", SD_SCHEDULER, "beta_end", 1.5, "beta_end must be a finite number in [1e-06, 1]"),
    ("DDIMScheduler", SD_SCHEDULER, "num_train_timesteps", 1000.0, "which is a float"),
    ("DDIMScheduler", SD_SCHEDULER, "set_alpha_to_one", "yes", "set_alpha_to_one must be true or false"),
    ("DDPMScheduler", SD_SCHEDULER, "variance_type", "fixed", "variance_type must be one of ("),
    ("DDPMScheduler", SD_SCHEDULER, "trained_betas", [0.1, -0.2], "entry [1] = -0.2"),
]


@pytest.mark.parametrize(("cls_name", "config", "key", "value", "message"), BAD_CONFIGS,
                         ids=[f"{c}-{k}={v!r}" for c, _, k, v, _ in BAD_CONFIGS])
def test_bad_config_value_is_refused_naming_file_key_and_value(tmp_path, cls_name, config, key, value, message):
    cls = getattr(pare, cls_name)
    path = tmp_path / cls.config_name
    path.write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError) as info:
        cls.from_config(tmp_path)
    text = str(info.value)
    assert str(path) in text and key in text and message in text


def test_config_file_that_is_not_a_json_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object"):
        pare.AutoencoderKL.from_config(tmp_path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="is not valid JSON"):
        pare.AutoencoderKL.from_config(tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda i: {**i, "unet": ["diffusers"]}, "unet=['diffusers'] must be a component entry"),
    (lambda i: {**i, "_class_name": 3}, "_class_name=3 must be a string"),
    (lambda i: [i], "must hold a JSON object, not a list"),
])
def test_bad_model_index_names_the_file_and_the_key(tmp_path, edit, message):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder("tiny-sd"), folder)
    index = folder / "model_index.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))
    with pytest.raises(ValueError) as info:
        pare.StableDiffusionPipeline.from_pretrained(folder)
    assert str(index) in str(info.value) and message in str(info.value)


# --- weight files --------------------------------------------------------------------------------


@pytest.fixture
def vae_folder(tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(make_checkpoint("vae", TINY_VAE), folder)
    return folder


def test_a_pickle_renamed_to_safetensors_is_not_safetensors(vae_folder):
    file = vae_folder / WEIGHTS
    torch.save(read_tensors(file), file)
    with pytest.raises(WeightLoadError, match="not a safetensors file") as info:
        pare.AutoencoderKL.from_pretrained(vae_folder)
    assert str(file) in str(info.value) and info.value.__cause__ is not None


def test_a_truncated_legacy_bin_names_the_file(vae_folder):
    tensors = read_tensors(vae_folder / WEIGHTS)
    (vae_folder / WEIGHTS).unlink()
    file = vae_folder / "diffusion_pytorch_model.bin"
    torch.save(tensors, file)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(WeightLoadError, match="truncated, or not a PyTorch checkpoint") as info:
        pare.AutoencoderKL.from_pretrained(vae_folder, allow_bin=True)
    assert str(file) in str(info.value) and info.value.__cause__ is not None


def test_a_tensor_of_the_wrong_dtype_or_shape_is_named(vae_folder):
    file = vae_folder / WEIGHTS
    tensors = read_tensors(file)
    tensors["encoder.conv_in.weight"] = tensors["encoder.conv_in.weight"].to(torch.int32)
    tensors["decoder.conv_out.bias"] = torch.zeros(7)
    save_file(tensors, str(file))
    with pytest.raises(WeightLoadError) as info:
        pare.AutoencoderKL.from_pretrained(vae_folder)
    text = str(info.value)
    assert str(file) in text
    assert "1 wrong-dtype keys" in text and "encoder.conv_in.weight: checkpoint torch.int32" in text
    assert "1 mis-shaped keys" in text and "decoder.conv_out.bias: checkpoint (7,)" in text


def test_a_shard_index_that_is_not_json(vae_folder):
    (vae_folder / WEIGHTS).unlink()
    index = vae_folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(WeightLoadError, match="is not a valid shard index: not JSON") as info:
        pare.AutoencoderKL.from_pretrained(vae_folder)
    assert str(index) in str(info.value)
