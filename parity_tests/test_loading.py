"""pare.loading and ModelMixin: official layouts load, anything else fails loudly and precisely.

A toy model keeps these tests about the loading rules; the UNet and VAE tests load real
diffusers-written checkpoints through the same code.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pare import ModelMixin, WeightLoadError
from pare.configuration import register_to_config


class Toy(ModelMixin):
    unsupported_config = {"dual_cross_attention": False}

    @register_to_config
    def __init__(self, width: int = 4, groups: int = 2):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.GroupNorm(groups, width)

    def forward(self, x):
        return self.norm(self.proj(x))


def saved(tmp_path, **kw):
    torch.manual_seed(0)
    model = Toy(width=8)
    model.save_pretrained(tmp_path, **kw)
    return model


def weights(folder):
    return folder / "diffusion_pytorch_model.safetensors"


def test_round_trip_is_exact_and_strict(tmp_path):
    model = saved(tmp_path)
    loaded = Toy.from_pretrained(tmp_path)
    assert loaded.config.width == 8 and not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_and_variant_layouts_load(tmp_path):
    model = saved(tmp_path, max_shard_size=100)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    assert torch.equal(Toy.from_pretrained(tmp_path).proj.weight, model.proj.weight)

    model.half().save_pretrained(tmp_path, variant="fp16")
    half = Toy.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.proj.weight, model.proj.weight)
    # Like diffusers, the default dtype is float32 whatever the file stores.
    assert Toy.from_pretrained(tmp_path, variant="fp16").dtype == torch.float32


def test_missing_variant_is_an_error_not_a_fallback(tmp_path):
    saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="No weights of variant 'fp16'"):
        Toy.from_pretrained(tmp_path, variant="fp16")


def test_every_bad_key_is_named(tmp_path):
    saved(tmp_path)
    sd = load_file(str(weights(tmp_path)))
    del sd["norm.bias"]
    sd["proj.extra"] = torch.zeros(1)
    sd["proj.weight"] = torch.zeros(8, 9)
    sd["proj.bias"] = torch.full((8,), float("nan"))
    save_file(sd, str(weights(tmp_path)))
    with pytest.raises(WeightLoadError) as e:
        Toy.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(weights(tmp_path)) in msg
    assert "1 missing keys:\n  norm.bias" in msg
    assert "1 unexpected keys:\n  proj.extra" in msg
    assert "proj.weight: checkpoint (8, 9), model (8, 8)" in msg
    assert "non-finite (NaN or inf) keys:\n  proj.bias" in msg


def test_legacy_bin_needs_opt_in_and_loads_weights_only(tmp_path):
    model = saved(tmp_path)
    weights(tmp_path).unlink()
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="allow_bin=True"):
        Toy.from_pretrained(tmp_path)
    assert torch.equal(Toy.from_pretrained(tmp_path, allow_bin=True).proj.weight, model.proj.weight)


def test_config_of_another_class_is_refused(tmp_path):
    saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="describes a AutoencoderKL, not a Toy"):
        Toy.from_pretrained(tmp_path)


def test_config_keys_unknown_ignored_unsupported_checked(caplog):
    toy = Toy.from_config({"width": 6, "_diffusers_version": "0.6.0", "sample_size": 64, "dual_cross_attention": False})
    assert toy.config.width == 6 and "sample_size" in caplog.text
    with pytest.raises(ValueError, match=r"dual_cross_attention=True, which pare does not implement"):
        Toy.from_config({"dual_cross_attention": True})
    with pytest.raises(TypeError, match="read-only"):
        toy.config["width"] = 3


def test_models_deepcopy_and_pickle_with_their_config():
    import copy
    import pickle

    toy = Toy.from_config({"width": 6})
    for twin in (copy.deepcopy(toy), pickle.loads(pickle.dumps(toy))):
        assert twin.config == toy.config and type(twin.config) is type(toy.config)
        assert twin.config.width == 6 and torch.equal(twin.proj.weight, toy.proj.weight)
        with pytest.raises(TypeError, match="read-only"):
            twin.config["width"] = 3


def test_hub_repo_id_resolves_from_a_local_snapshot(tmp_path, monkeypatch):
    # The layout huggingface_hub keeps in its cache: models--org--name/{refs/main, snapshots/<sha>/...}.
    repo = tmp_path / "hub" / "models--pare-test--toy"
    sha = "0123456789abcdef0123456789abcdef01234567"
    model = saved(repo / "snapshots" / sha / "unet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = Toy.from_pretrained("pare-test/toy", subfolder="unet", cache_dir=tmp_path / "hub", local_files_only=True)
    assert torch.equal(loaded.proj.weight, model.proj.weight)


def test_neither_folder_nor_repo_id():
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo id"):
        Toy.from_pretrained("./no/such/folder")
