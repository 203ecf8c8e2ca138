"""The CLI's error rules (exit 2 for usage, 1 for runtime errors, one line, a traceback only with --debug)
and atomic writes (an output is complete or absent, never half-written)."""

import PIL.Image
import pytest

import pare
from pare.atomic import write_atomically, write_text_atomically
from pare.cli import main

from .tiny_components import pipeline_folder


def generate(*args: str) -> list[str]:
    return ["generate", "--model", str(pipeline_folder("tiny-sd")), "--prompt", "a", "--steps", "1",
            "--height", "16", "--width", "16", *args]


@pytest.fixture
def broken_unet(monkeypatch):
    """A runtime error from deep inside a run, of a type generate does not catch itself."""
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)\nsecond line of detail")

    monkeypatch.setattr(pare.UNet2DConditionModel, "forward", fail)


def test_runtime_error_is_one_line_with_exit_code_1(tmp_path, capsys, broken_unet):
    args = generate("--out", str(tmp_path / "x.png"))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "pare generate: error: CUDA out of memory (pretend) second line of detail" in err.splitlines()
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no PNG and no temporary file


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_shows_the_traceback(tmp_path, broken_unet, where):
    args = generate("--out", str(tmp_path / "x.png"))
    args = ["--debug", *args] if where == "first" else [*args, "--debug"]
    with pytest.raises(RuntimeError, match="pretend"):
        main(args)


def test_missing_model_folder_is_a_runtime_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "pare generate: error:" in err and "nowhere" in err and "Traceback" not in err


def test_unknown_image_extension_is_a_usage_error(tmp_path, capsys):
    pipeline_folder("tiny-sd")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(generate("--out", str(tmp_path / "x.notanimage")))
    assert info.value.code == 2
    assert "pare generate: error: --out" in capsys.readouterr().err


def test_negative_or_infinite_strength_on_the_command_line(tmp_path, capsys):
    image = tmp_path / "in.png"
    PIL.Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(SystemExit) as info:
        main(generate("--image", str(image), "--strength", "inf", "--out", str(tmp_path / "x.png")))
    assert info.value.code == 2 and "--strength must be a finite number" in capsys.readouterr().err
    assert main(generate("--image", str(image), "--strength", "-0.5", "--out", str(tmp_path / "x.png"))) == 1
    assert "strength` must be in (0, 1]" in capsys.readouterr().err


# --- atomic writes ------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def half_then_fail(path):
        path.write_text("{half")
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_write_keeps_the_suffix_for_pil_and_replaces_the_target(tmp_path):
    target = tmp_path / "sub" / "cat.png"
    image = PIL.Image.new("RGB", (3, 2), "red")
    write_atomically(target, image.save)  # PIL picks PNG from the temporary's suffix
    assert PIL.Image.open(target).format == "PNG" and PIL.Image.open(target).size == (3, 2)
    write_text_atomically(tmp_path / "a.md", "one")
    write_text_atomically(tmp_path / "a.md", "two")
    assert (tmp_path / "a.md").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "sub"]


def test_atomic_write_to_a_directory_names_it(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_text_atomically(tmp_path, "x")


def test_generate_writes_its_png_atomically(tmp_path, monkeypatch, capsys):
    """PIL fails half-way through writing the PNG: the --out file is absent, and no temporary is left."""
    real_save = PIL.Image.Image.save

    def save_half(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(10)
        raise OSError("disk full (pretend)")

    monkeypatch.setattr(PIL.Image.Image, "save", save_half)
    assert main(generate("--out", str(tmp_path / "x.png"))) == 1
    assert "pare generate: error: disk full (pretend)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
