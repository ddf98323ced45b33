"""Model-path resolution and tokenizer pad handling (no model weights needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import DataArgs, ModelArgs
from engine.data import sources
from engine.errors import UserError
from engine.models.load import load_tokenizer, resolve_model_path
from engine.runtime.distributed import DistInfo

TOKENIZER = Path(__file__).resolve().parents[2] / "engine" / "assets" / "tiny_tokenizer"
DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _tokenizer_folder(tmp_path: Path, pad: bool, eos: bool) -> Path:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER / "tokenizer.json"),
                                  pad_token="<pad>" if pad else None, eos_token="<|endoftext|>" if eos else None)
    folder = tmp_path / f"tok_{pad}_{eos}"
    tok.save_pretrained(str(folder))
    return folder


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    tok = load_tokenizer(str(_tokenizer_folder(tmp_path, pad=False, eos=True)), ModelArgs())
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"


def test_no_pad_and_no_eos_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither a pad nor an eos token"):
        load_tokenizer(str(_tokenizer_folder(tmp_path, pad=False, eos=False)), ModelArgs())


def test_add_eot_token_adds_one_special_token(tmp_path):
    folder = _tokenizer_folder(tmp_path, pad=True, eos=True)
    plain = load_tokenizer(str(folder), ModelArgs())
    with_eot = load_tokenizer(str(folder), ModelArgs(), DataArgs(add_eot_token=True, eot_token="<|eot|>"))
    assert len(with_eot) == len(plain) + 1
    assert with_eot.convert_ids_to_tokens(with_eot("x<|eot|>")["input_ids"])[-1] == "<|eot|>"


def test_model_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(ModelArgs(model_name_or_path=str(tmp_path)), 1, DIST)


@pytest.mark.parametrize("path", ["./no/such/model", "/abs/missing"])
def test_missing_local_model_path_is_refused(path):
    with pytest.raises(UserError, match="no such model folder"):
        resolve_model_path(ModelArgs(model_name_or_path=path), 1, DIST)


def test_hub_name_passes_through():
    assert resolve_model_path(ModelArgs(model_name_or_path="facebook/opt-125m"), 1, DIST) == "facebook/opt-125m"


def test_local_jsonfile_reads_data_folder(tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text('[{"prompt": " Human: a Assistant:", "chosen": " b", "rejected": " c"}]')
    (tmp_path / "eval.json").write_text('[{"prompt": " Human: d Assistant:", "chosen": " e", "rejected": " f"}]')
    monkeypatch.setattr(sources, "LOCAL_JSONFILE_DIR", tmp_path)
    train, evals = sources.load_source("local/jsonfile", tokenizer=None, seed=1)
    assert train == [sources.Row(" Human: a Assistant:", " b", " c")]
    assert evals == [sources.Row(" Human: d Assistant:", " e", " f")]


def test_one_loader_pads_on_the_side_asked(tmp_path):
    folder = str(_tokenizer_folder(tmp_path, pad=True, eos=True))
    assert load_tokenizer(folder).padding_side == "right"
    left = load_tokenizer(folder, ModelArgs(), padding_side="left")
    assert left.padding_side == "left"
    assert left(["a", "a b c"], padding=True)["attention_mask"][0][0] == 0  # the short one is padded first


def test_a_config_pad_id_other_than_the_tokenizers_is_warned_about_naming_both(tmp_path, caplog):
    from transformers import LlamaConfig

    from engine.models.load import warn_pad_mismatch

    tok = load_tokenizer(str(_tokenizer_folder(tmp_path, pad=True, eos=True)), ModelArgs())
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert eos != pad
    with caplog.at_level("WARNING", logger="engine"):
        warn_pad_mismatch("step1_folder", LlamaConfig(pad_token_id=pad), pad)  # they agree: silent
        warn_pad_mismatch("step1_folder", LlamaConfig(pad_token_id=None), pad)  # unset: silent
        assert caplog.records == []
        # DeepSpeed-Chat's step 1 saves the config with pad_token_id = eos_token_id
        warn_pad_mismatch("step1_folder", LlamaConfig(pad_token_id=eos), pad, role="actor")
        warn_pad_mismatch("step1_folder", LlamaConfig(pad_token_id=eos), pad, role="reference")  # once per folder
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert f"pad_token_id {eos}" in text and f"pad token id is {pad}; using {pad}" in text and "step1_folder" in text


def test_loading_a_folder_whose_config_pad_id_disagrees_warns_and_uses_the_tokenizers(tmp_path, engine_cache,
                                                                                       caplog):
    import json
    import shutil

    from engine.models.load import load_causal_lm
    from tests.conftest import tiny_model_folder

    folder = tmp_path / "dschat_step1"
    shutil.copytree(tiny_model_folder(engine_cache), folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = config["eos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    with caplog.at_level("WARNING", logger="engine"):
        model = load_causal_lm(str(folder), ModelArgs(), tok, "fp32", None, False, role="actor")
    assert model.config.pad_token_id == tok.pad_token_id != config["eos_token_id"]
    assert any(f"pad_token_id {config['eos_token_id']}" in r.getMessage() and "(the actor model)" in r.getMessage()
               for r in caplog.records)
