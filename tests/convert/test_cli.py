"""`pi0-convert` command line: bad input gives one line on stderr, exit code 2, and no output directory."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pi0_lightning.convert.cli import main


def _fails(argv, capsys, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for n in needles:
        assert n in err
    return err


def test_missing_path(tmp_path, capsys):
    _fails(["openpi", str(tmp_path / "nope"), str(tmp_path / "out")], capsys, "does not exist")
    assert not (tmp_path / "out").exists()


def test_directory_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    _fails(["openpi", str(tmp_path / "junk"), str(tmp_path / "out")], capsys, "not an openpi")
    _fails(["lerobot", str(tmp_path / "junk"), str(tmp_path / "out")], capsys, "model.safetensors")
    _fails(["export-lerobot", str(tmp_path / "junk"), str(tmp_path / "out")], capsys, "not a pi0_lightning")
    assert not (tmp_path / "out").exists()


def test_pi0_fast_converts_and_loads(openpi_fixtures, tmp_path):
    import numpy as np
    import torch

    from pi0_lightning.model.pi0_fast import PI0FAST

    assert main(["openpi", str(openpi_fixtures / "pi0_fast_tiny"), str(tmp_path / "fast")]) == 0
    model = PI0FAST.from_pretrained(tmp_path / "fast")
    assert model.config.paligemma.width == 16 and (tmp_path / "fast" / "norm_stats.json").is_file()
    ref = np.load(openpi_fixtures / "pi0_fast_tiny" / "reference.npz")
    emb = model.llm.embed_tokens.weight
    assert emb.dtype == torch.float32 and emb.shape == (257152, 16)
    assert ref["train_loss"].shape == (3,)


def test_existing_output_is_kept_unless_overwrite(converted, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails(["export-lerobot", str(converted("pi0_tiny")), str(out)], capsys, str(out))
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["export-lerobot", str(converted("pi0_tiny")), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_console_script_exit_code(tmp_path):
    exe = shutil.which("pi0-convert", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("pi0-convert console script not installed in this environment")
    r = subprocess.run([exe, "openpi", str(tmp_path / "nope"), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("pi0-convert openpi: error:")


def test_fast_processor_is_bundled_and_checked(openpi_fixtures, tmp_path, capsys):
    pytest.importorskip("tensorstore")
    from pi0_lightning.policy.assets import synthetic_fast_tokenizer
    from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer

    processor = synthetic_fast_tokenizer(10, 7).save_pretrained(tmp_path / "processor")
    src = str(openpi_fixtures / "pi0_fast_tiny")
    assert main(["openpi", src, str(tmp_path / "fast"), "--fast-tokenizer", str(processor)]) == 0
    assert FASTActionTokenizer.from_pretrained(tmp_path / "fast" / "fast_tokenizer").vocab_size > 0
    assert main(["openpi", src, str(tmp_path / "bad"), "--fast-tokenizer", str(tmp_path / "nowhere")]) == 2
    pi0 = str(openpi_fixtures / "pi0_tiny")
    assert main(["openpi", pi0, str(tmp_path / "pi0"), "--fast-tokenizer", str(processor)]) == 2
    err = capsys.readouterr().err
    assert "not a FAST processor directory" in err and "is for PI0-FAST checkpoints" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "pi0").exists()
