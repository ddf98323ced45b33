"""The embedded default: a tiny Llama-architecture model and its tokenizer, with no download.

The tokenizer is a byte-level BPE (any text encodes) trained on the bundled task data and shipped in
`engine/assets/tiny_tokenizer/`; `build_tokenizer` remakes it and a test checks the two agree. The
model has random weights from a fixed seed, written once to a cache folder, and from then on it loads
like any local Hugging Face folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.data.sort_task import ASSET_DIR as DATA_DIR
from engine.runtime.atomic import cache_root, write_cache_folder

TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "tiny_tokenizer"
EOS, PAD = "<|endoftext|>", "<pad>"
VOCAB_SIZE = 384

# Small enough that the whole three-step pipeline runs in minutes on 2 CPU cores.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, rope_theta=10000.0)


def build_tokenizer(out_dir: Path = TOKENIZER_DIR) -> None:
    """Train the byte-level BPE on the bundled data and save it as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in (DATA_DIR / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   padding_side="right", model_max_length=TINY_LLAMA["max_position_embeddings"])
    fast.save_pretrained(str(out_dir))


def tiny_model_dir(seed: int) -> Path:
    """Where the built-in model for `seed` lives (keyed by its shape, seed and tokenizer)."""
    tok_bytes = (TOKENIZER_DIR / "tokenizer.json").read_bytes()
    key = hashlib.sha256(json.dumps([TINY_LLAMA, seed]).encode() + tok_bytes).hexdigest()[:12]
    return cache_root() / f"tiny-llama-{key}"


def ensure_tiny_model(seed: int) -> Path:
    """Write the built-in model folder if it is not there yet; return its path.

    Written to a temporary folder and renamed, so concurrent ranks and crashes never see half of it.
    Call on one rank per machine (then barrier) to avoid doing the work twice.
    """
    target = tiny_model_dir(seed)
    if (target / "config.json").is_file():
        return target
    import torch  # here, not above: importing the Llama classes takes seconds a ready folder does not need
    from safetensors.torch import save_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TINY_LLAMA)
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)

    def write(folder: Path) -> None:
        # Not model.save_pretrained: once torch.distributed is up, transformers writes only on global rank 0, and
        # this runs on local rank 0 of every machine (a second machine then published a folder without weights).
        model.config.architectures = [type(model).__name__]  # as save_pretrained records them
        model.config.dtype = next(model.parameters()).dtype
        model.config.save_pretrained(str(folder))
        model.generation_config.save_pretrained(str(folder))
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(folder))

    write_cache_folder(target, write, f"cannot write the built-in model to {target}",
                       "free disk space or set RLHF_ENGINE_CACHE to a folder you can write to")
    return target


if __name__ == "__main__":
    build_tokenizer()
