"""`pare generate --prompts`: prompt files, batches, a 2-rank torchrun run whose images equal the serial run's,
and resuming (what exists is skipped; what is missing is made again, the same pixels)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pare.cli import main
from pare.prompts import Prompt, batches, read_prompts

from .harness import ROOT, subprocess_env
from .tiny_components import pipeline_folder

ENV = subprocess_env()

# SDXL: its unconditional half is zeros without a negative prompt, so negative-prompt presence splits batches.
PROMPTS = [{"prompt": "a cat", "seed": 5}, {"prompt": "a dog", "height": 16, "width": 24},
           {"prompt": "a house", "negative_prompt": "blurry"}, {"prompt": "a tree", "negative_prompt": "dark", "seed": 11},
           {"prompt": "a boat"}, {"prompt": "a red boat"}]
# Euler a draws noise at every step: each prompt's must come from its own generator, whatever its batch holds.
FLAGS = ["--steps", "2", "--batch-size", "2", "--height", "32", "--width", "32", "--sampler", "Euler a",
         "--device", "cpu"]
TIMING = ("seconds", "rank", "finished")


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def manifest(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_prompt_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("a cat\n\n  a dog on a hill  \n")
    assert read_prompts(plain, base_seed=10, height=64) == [Prompt(0, "a cat", 10, 64), Prompt(1, "a dog on a hill", 11, 64)]
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl"), negative_prompt="ugly")
    assert [p.file_name for p in prompts] == ["000000-seed5.png", "000001-seed1.png", "000002-seed2.png",
                                              "000003-seed11.png", "000004-seed4.png", "000005-seed5.png"]
    assert prompts[1] == Prompt(1, "a dog", 1, 16, 24, "ugly") and prompts[2].negative_prompt == "blurry"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat", "steps": 4}', r"p.jsonl:2: unknown keys \['steps'\]"),
    ('{"seed": 4}', 'p.jsonl:2: no "prompt" key'),
    ('{"prompt": "a cat", "seed": -1}', r"p.jsonl:2: seed must be in \[0, 2\*\*63 - 1\]"),
    ('{"prompt": "a cat", "height": 20}', "p.jsonl:2: height must be a positive multiple of 8, got 20"),
    ('{"prompt": "a cat", "width": "64"}', "p.jsonl:2: width must be an integer"),
    ('["a cat"]', "p.jsonl:2: expected a JSON object"),
    ('{"prompt": "a cat",', "p.jsonl:2: not a JSON object"),
])
def test_bad_prompt_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_bad_prompt_files_are_usage_errors(tmp_path, capsys):
    json_as_text = tmp_path / "p.txt"
    json_as_text.write_text('{"prompt": "a cat"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for path, message in ((json_as_text, "looks like JSON lines"), (empty, "has no prompts"),
                          (tmp_path / "none.txt", "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "--model", str(pipeline_folder("tiny-sd")), "--prompts", str(path),
                  "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "x", "--prompts", str(empty), "--out", str(tmp_path / "a.png")])
    assert exit_.value.code == 2 and "with --prompts, --out is the folder" in capsys.readouterr().err


def test_batches_group_by_size_and_negative_prompt_in_prompt_order():
    ps = [Prompt(0, "a", 0), Prompt(1, "b", 1, negative_prompt="x"), Prompt(2, "c", 2), Prompt(3, "d", 3, 16, 16),
          Prompt(4, "e", 4), Prompt(5, "f", 5, negative_prompt="")]
    assert [[p.index for p in b] for b in batches(ps, 2)] == [[0, 2], [1, 5], [3], [4]]
    assert [[p.index for p in b] for b in batches(ps, 1)] == [[i] for i in range(6)]


def test_two_ranks_make_the_serial_images_and_a_rerun_resumes(tmp_path, capsys, one_thread):
    from PIL import Image

    folder, prompts = str(pipeline_folder("tiny-sdxl")), str(write_prompts(tmp_path / "p.jsonl"))
    serial, two = tmp_path / "serial", tmp_path / "two"
    assert main(["generate", "--model", folder, "--prompts", prompts, "--out", str(serial), *FLAGS]) == 0
    assert "made 6 images, skipped 0" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pare.cli", "generate", "--model", folder, "--prompts", prompts, "--out", str(two),
                           *FLAGS], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # batches [0, 4], [1], [2, 3], [5]: rank 0 takes the first and third, rank 1 the others
    assert "rank 0/2: made 4 images" in proc.stdout and "rank 1/2: made 2 images" in proc.stdout
    names = sorted(p.name for p in serial.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 6
    for name in names:
        a, b = Image.open(serial / name), Image.open(two / name)
        assert a.size == b.size and a.tobytes() == b.tobytes(), name
    assert Image.open(serial / "000001-seed1.png").size == (24, 16)
    assert len({Image.open(serial / n).tobytes() for n in names}) == 6  # six different images
    assert manifest(two) == manifest(serial) and [e["index"] for e in manifest(serial)] == list(range(6))
    entry = manifest(serial)[3]
    assert entry["scheduler"] == "EulerAncestralDiscreteScheduler" and entry["steps"] == 2 and entry["seed"] == 11
    assert entry["guidance"] == 5.0 and entry["file"] == "000003-seed11.png" and entry["negative_prompt"] == "dark"
    assert not list(two.glob("manifest.rank*"))  # merged into manifest.jsonl

    # Resume: nothing to do; then one image lost: its batch runs again and writes only it, the same pixels.
    before = {n: (serial / n).stat().st_mtime_ns for n in names}
    assert main(["generate", "--model", folder, "--prompts", prompts, "--out", str(serial), *FLAGS]) == 0
    assert "made 0 images, skipped 6" in capsys.readouterr().out
    assert {n: (serial / n).stat().st_mtime_ns for n in names} == before
    lost = Image.open(serial / "000004-seed4.png").tobytes()
    (serial / "000004-seed4.png").unlink()
    assert main(["generate", "--model", folder, "--prompts", prompts, "--out", str(serial), *FLAGS]) == 0
    assert "made 1 images, skipped 5" in capsys.readouterr().out
    assert Image.open(serial / "000004-seed4.png").tobytes() == lost
    assert (serial / "000000-seed5.png").stat().st_mtime_ns == before["000000-seed5.png"]  # its batch-mate
    assert manifest(serial) == manifest(two)

    # Other settings into the same folder: refused, naming the image and the setting.
    assert main(["generate", "--model", folder, "--prompts", prompts, "--out", str(serial),
                 *FLAGS[:1], "3", *FLAGS[2:]]) == 1
    assert "000000-seed5.png was made with steps 2, this run asks for 3" in capsys.readouterr().err
