"""`python -m engine.doctor` says which torch build is installed, whether it sees a GPU, and where the
compiled ops go (issue 17, item 1)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from engine import doctor


def fake_torch(cuda: str | None = None, hip: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(version=SimpleNamespace(cuda=cuda, hip=hip))


@pytest.mark.parametrize("cuda, hip, build", [(None, None, "CPU"), ("12.8", None, "CUDA 12.8"),
                                              (None, "6.2.4", "ROCm 6.2.4")])
def test_torch_build(cuda, hip, build):
    assert doctor.torch_build(fake_torch(cuda, hip)) == build


def test_op_cache_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert doctor.extension_cache(torch) == (tmp_path, "TORCH_EXTENSIONS_DIR")


@pytest.mark.parametrize("cuda, hip", [(None, None), ("12.8", None), (None, "6.2")])
def test_op_cache_default_is_torchs(monkeypatch, tmp_path, cuda, hip):
    """The folder torch itself builds into, for each kind of build."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    torchs = cpp_extension._get_build_directory("some_op", False)  # creates tmp_path/<folder>/some_op
    folder, source = doctor.extension_cache(torch)
    assert (str(folder / "some_op"), source) == (torchs, "torch's default")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert folder.name == py + {(None, None): "_cpu", ("12.8", None): "_cu128", (None, "6.2"): "_rocm62"}[cuda, hip]


def test_advice():
    cpu_index = "pip install torch=="
    assert cpu_index in doctor.advice("CUDA 12.8", [], driver=False)
    assert "--index-url https://download.pytorch.org/whl/cpu" in doctor.advice("CUDA 12.8", [], driver=False)
    assert "CUDA build" in doctor.advice("CPU", [], driver=True)
    assert doctor.advice("CPU", [], driver=False) is None
    assert doctor.advice("CUDA 12.8", ["NVIDIA H100"], driver=True) is None


def test_report_names_this_torch():
    lines = dict(doctor.report())
    assert lines["torch"] == torch.__version__
    assert lines["torch build"] == (f"ROCm {torch.version.hip}" if torch.version.hip else
                                    f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU")
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in lines["GPUs"]
    else:
        assert lines["GPUs"] == "none visible"
    assert {"python", "deepspeed", "transformers", "op cache"} <= set(lines)


def test_printed_as_aligned_lines(capsys):
    doctor.main()
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ", 1)[0].strip() for line in out] == [name for name, _ in doctor.report()]
    assert len({len(line) - len(line[line.index("  "):].lstrip()) for line in out}) == 1  # one value column


def test_no_torch_says_how_to_install(monkeypatch, capsys):
    real = doctor.version_of
    monkeypatch.setattr(doctor, "version_of", lambda name: None if name == "torch" else real(name))
    with pytest.raises(SystemExit, match="--index-url https://download.pytorch.org/whl/cpu"):
        doctor.main()
    assert "torch         not installed" in capsys.readouterr().out
