"""Safe files: nothing we load unpickles untrusted data, remote code is off by default, caches live in the
user's own folders, and a cache write cut short never leaves a cache that a later run loads."""
from __future__ import annotations

import ast
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from engine.config import Step1Config, Step2Config, Step3Config
from engine.data import cache, sft
from engine.data.sft import load_sft_data
from engine.flags import make_config
from engine.runtime.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pattern in ("engine/**/*.py", "step*/**/*.py", "benchmarks/**/*.py", "*.py")
                 for p in ROOT.glob(pattern))
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# (a) static check: no unpickling, no remote code switched on in the sources
# ----------------------------------------------------------------------------------------------
def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loading(source: str) -> list[str]:
    """What in `source` can unpickle untrusted data or run remote code: pickle-family imports,
    torch.load without weights_only=True, np.load(allow_pickle=True), trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if (owner, node.func.attr) == ("torch", "load") and not _is_true(_keyword(node, "weights_only")):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            allow = _keyword(node, "allow_pickle")
            if (owner, node.func.attr) in {("np", "load"), ("numpy", "load")} and allow is not None and not (
                    isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"line {node.lineno}: np.load with allow_pickle")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and _is_true(node.value):
            found.append(f"line {node.value.lineno}: trust_remote_code=True")
    return found


def test_the_static_check_finds_each_kind_of_unsafe_loading():
    bad = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\nf(x, trust_remote_code=True)\n")
    assert [f.split(": ", 1)[1] for f in unsafe_loading(bad)] == [
        "imports pickle", "imports joblib", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "np.load with allow_pickle", "trust_remote_code=True"]
    assert unsafe_loading("import torch\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
                          "f(trust_remote_code=cfg.trust_remote_code)\n") == []


def test_no_source_unpickles_or_enables_remote_code():
    assert len(SOURCES) > 30  # the globs found the code
    problems = {str(p.relative_to(ROOT)): found for p in SOURCES if (found := unsafe_loading(p.read_text()))}
    assert problems == {}


# ----------------------------------------------------------------------------------------------
# (b) caches in the user's folders, (c) remote code off by default
# ----------------------------------------------------------------------------------------------
def test_default_model_cache_is_the_users_not_a_temp_folder(monkeypatch, tmp_path):
    from engine.runtime.atomic import cache_root

    monkeypatch.delenv("RLHF_ENGINE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert cache_root() == Path("/home/someone/.cache/rlhf_engine")
    assert not cache_root().is_relative_to(tempfile.gettempdir())
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says: ignore a relative path
    assert cache_root() == Path("/home/someone/.cache/rlhf_engine")
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/someone/xdg")
    assert cache_root() == Path("/home/someone/xdg/rlhf_engine")
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


@pytest.mark.parametrize("config", [Step1Config, Step2Config, Step3Config])
def test_data_cache_defaults_into_the_output_folder(config):
    # None means <output_dir>/data_cache (DeepSpeed-Chat's default is the shared /tmp/data_files).
    assert make_config(config).data.data_output_path is None


@pytest.mark.parametrize("config", [Step1Config, Step2Config, Step3Config])
def test_trust_remote_code_is_off_by_default(config):
    assert make_config(config).model.trust_remote_code is False


# ----------------------------------------------------------------------------------------------
# (d) a data-cache write cut short
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from engine.models.tiny import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture
def counted_builds(monkeypatch) -> list[int]:
    """Counts the cache builds of step 1's loader."""
    builds, real = [], sft._build

    def build(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "_build", build)
    return builds


def _data(tmp_path: Path):
    from engine.config import Step1DataArgs

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f" Human: sort {i} 1 Assistant:", "chosen": f" 1 {i}"}) + "\n"
                            for i in range(2, 22)))
    return Step1DataArgs(data_path=[str(path)], data_split="10,0,0")


def _ids(dataset) -> list[list[int]]:
    return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]


class Crash(Exception):
    """Stands for the process dying in the middle of the write."""


def test_a_write_that_crashes_half_way_leaves_no_cache(tmp_path, tok, counted_builds, monkeypatch):
    data, cache_dir = _data(tmp_path), tmp_path / "cache"
    real_save = cache.save_file

    def half_then_crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[: Path(filename).stat().st_size // 2])
        raise Crash

    monkeypatch.setattr(cache, "save_file", half_then_crash)
    with pytest.raises(Crash):
        load_sft_data(data, tok, cache_dir, 3, DIST)
    assert list(cache_dir.iterdir()) == []  # neither the cache nor the half-written temp file
    monkeypatch.setattr(cache, "save_file", real_save)
    train, _ = load_sft_data(data, tok, cache_dir, 3, DIST)
    assert len(counted_builds) == 2 and len(train) == 18


def test_a_damaged_cache_file_is_rebuilt_not_loaded(tmp_path, tok, counted_builds):
    data, cache_dir = _data(tmp_path), tmp_path / "cache"
    train = _ids(load_sft_data(data, tok, cache_dir, 3, DIST)[0])
    [path] = list(cache_dir.iterdir())
    # What a non-atomic writer killed mid-write, or a truncated copy, leaves at the cache's own name; and a
    # temp file a killed process had no chance to remove.
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (cache_dir / (path.name + ".tmp-killed")).write_bytes(b"garbage")
    again, _ = load_sft_data(data, tok, cache_dir, 3, DIST)
    assert len(counted_builds) == 2
    assert _ids(again) == train
    assert sorted(p.name for p in cache_dir.iterdir()) == [path.name, path.name + ".tmp-killed"]


# ----------------------------------------------------------------------------------------------
# (d) the one atomic writer (engine.runtime.atomic): every temp-and-rename in engine/ goes through it
# ----------------------------------------------------------------------------------------------
def test_no_temp_and_rename_outside_the_atomic_module():
    allowed = ROOT / "engine" / "runtime" / "atomic.py"
    for path in sorted((ROOT / "engine").rglob("*.py")):
        text = path.read_text()
        hits = [w for w in ("os.replace(", "os.rename(", "mkstemp(", "mkdtemp(", ".rename(") if w in text]
        assert path == allowed or not hits, f"{path.relative_to(ROOT)} renames files itself ({hits})"


def test_write_atomically_with_a_writer_that_crashes_leaves_the_old_file(tmp_path):
    from engine.runtime.atomic import write_atomically

    path = tmp_path / "x.bin"
    write_atomically(path, b"old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_crash)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    write_atomically(path, lambda tmp: tmp.write_bytes(b"new"), fsync=True)
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_publish_folder_replaces_a_non_model_folder_whole(tmp_path):
    from engine.runtime.atomic import publish_folder, staging_folder

    target = tmp_path / "report"
    target.mkdir()
    (target / "stale.png").write_text("old")
    with staging_folder(target) as staging:
        (staging / "summary.json").write_text("{}")
        publish_folder(staging, target, model=False)
    assert [p.name for p in target.iterdir()] == ["summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging or deleted folder left


# ----------------------------------------------------------------------------------------------
# (d) published outputs follow the umask, not mkstemp's 0600 / mkdtemp's 0700
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=[(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)], ids=["umask022", "umask027"])
def umask_modes(request):
    """(file mode, folder mode) a plain open() / mkdir() gives under the umask this sets (restored after)."""
    mask, file_mode, folder_mode = request.param
    old = os.umask(mask)
    yield file_mode, folder_mode
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in sorted(root.rglob("*"))}


def test_process_umask_is_read_without_proc_too(umask_modes, monkeypatch):
    from engine.runtime.atomic import process_umask

    mask = 0o777 & ~umask_modes[1]
    assert process_umask() == mask
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert process_umask() == mask and process_umask() == mask  # the fallback restores what it read


def test_published_files_and_folders_follow_the_umask(tmp_path, umask_modes):
    from engine.runtime.atomic import publish_folder, staging_folder, write_atomically

    file_mode, folder_mode = oct(umask_modes[0]), oct(umask_modes[1])
    write_atomically(tmp_path / "config.yaml", "a: 1\n")
    write_atomically(tmp_path / "model.safetensors", lambda tmp: tmp.write_bytes(b"w"), fsync=True)
    for name, model in (("report", False), ("actor", True)):
        with staging_folder(tmp_path / name) as staging:
            (staging / "sub").mkdir()
            write_atomically(staging / "sub" / "curves.png", b"png")  # private temp file inside a private folder
            write_atomically(staging / "config.json", "{}")
            publish_folder(staging, tmp_path / name, model=model)
    with staging_folder(tmp_path / "actor") as staging:  # a model folder replaced file by file
        write_atomically(staging / "model.safetensors", b"w2")
        write_atomically(staging / "config.json", "{}")
        publish_folder(staging, tmp_path / "actor")
    expected = {"config.yaml": file_mode, "model.safetensors": file_mode, "actor/model.safetensors": file_mode}
    for name in ("report", "actor"):
        expected |= {name: folder_mode, f"{name}/config.json": file_mode, f"{name}/sub": folder_mode,
                     f"{name}/sub/curves.png": file_mode}
    assert modes(tmp_path) == expected


def test_an_executable_file_keeps_its_execute_bits(tmp_path, umask_modes):
    from engine.runtime.atomic import publish_folder, staging_folder

    with staging_folder(tmp_path / "ckpt") as staging:
        (staging / "zero_to_fp32.py").write_text("print()")
        os.chmod(staging / "zero_to_fp32.py", 0o700)
        publish_folder(staging, tmp_path / "ckpt", model=False)
    assert modes(tmp_path)["ckpt/zero_to_fp32.py"] == oct(umask_modes[1])
