"""Which model names are local folders (`engine.models.paths`), and the messages of a missing folder, an
uncached hub name in offline mode and a failed hub load (no network and no model weights needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import UserError
from engine.models.paths import check_model_source, hub_error, looks_local


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """A working directory holding `output/` (as after a step ran) and an empty file `notes`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    (tmp_path / "notes").write_text("")
    return tmp_path


@pytest.mark.parametrize("name, local", [
    ("output/nope", True),         # rule 4: owner/name shape, but output/ is here
    ("elsewhere/nope", False),     # owner/name shape and no such folder here: a hub name
    ("facebook/opt-125m", False),
    ("gpt2", False),
    ("output", True),              # rule 1: exists
    ("notes", True),               # rule 1: a file (refused as not a folder)
    ("./nope", True), ("../nope", True), ("/abs/nope", True), ("~/nope", True), (".", True), ("..", True),
    ("nope/", True),               # rule 2: a trailing slash
    ("a/b/c", True),               # rule 3: more than one slash
    ("my model", True), ("a--b/c", True), ("x" * 97, True),  # rule 5: not a valid hub name
])
def test_which_names_are_local(here, name, local):
    assert looks_local(name) is local


def test_a_missing_local_folder_names_role_flag_and_fix(here):
    with pytest.raises(UserError) as err:
        check_model_source("output/nope", "critic", "critic_model_name_or_path", "; run step 2 first")
    assert str(err.value) == ("--critic_model_name_or_path (the critic model): no such model folder output/nope "
                              "(it does not exist here); run step 2 first")
    with pytest.raises(UserError) as err:
        check_model_source("./nope", "chat", "path")
    assert str(err.value) == ("--path (the chat model): no such model folder ./nope (it does not exist here); "
                              "give a Hugging Face model folder (a step's --output_dir) or a hub name")
    with pytest.raises(UserError, match=r"^--path \(the chat model\): notes is a file, not a model folder"):
        check_model_source("notes", "chat", "path")


def test_folders_and_hub_names_pass(here):
    assert check_model_source("output", "sft") == "output"
    assert check_model_source("~", "sft") == str(Path.home())  # a local path comes back with ~ expanded
    assert check_model_source("elsewhere/nope", "sft") == "elsewhere/nope"


def _cache_with(root: Path, repo: str) -> None:
    """A Hugging Face hub cache at `root` holding config.json of `repo` (its layout: models--owner--name)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    root = tmp_path / "hub"
    _cache_with(root, "acme/cached")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_and_not_cached_says_offline_mode_is_on(hub_cache, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    message = str(hub_error("acme/uncached", OSError("We couldn't connect"), "reward"))
    assert message == (f"cannot load 'acme/uncached' of the reward model: offline mode is on ({var}=1) and the "
                       f"Hugging Face cache does not hold it; unset {var} to download it once, or pass a local "
                       "model folder")


def test_offline_but_cached_or_online_blames_the_load_not_offline_mode(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = str(hub_error("acme/cached", ValueError("bad config"), "actor"))
    assert cached.startswith("cannot load 'acme/cached' of the actor model (ValueError: bad config); check the name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online = str(hub_error("acme/uncached", OSError("no route"), "actor"))
    assert "offline" not in online and online.endswith("check the name, your network or HF_TOKEN, or pass a local "
                                                       "model folder")


def test_step3_default_role_folders_are_local_where_no_output_folder_exists(tmp_path, monkeypatch):
    """Run from a folder without `output/`, step 3's default actor and critic folders are refused at once as
    missing folders (with the step to run), not tried on the hub as owner "output"."""
    from engine.config import Step3Config
    from engine.flags import make_config
    from engine.models.roles import check_role_paths

    monkeypatch.chdir(tmp_path)
    cfg = make_config(Step3Config)
    assert looks_local(cfg.model.actor_model_name_or_path) and looks_local(cfg.model.critic_model_name_or_path)
    with pytest.raises(UserError, match=r"no such model folder \./output/step1_sft .*run step 1 first"):
        check_role_paths(cfg)
