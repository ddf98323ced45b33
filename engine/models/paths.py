"""Where a model comes from: a local folder or a Hugging Face hub name, decided by one rule for every loader.

`--model_name_or_path output/nope` is shaped like a hub name (`owner/name`), so transformers would try the
hub with it (49.5 s of retries without a network, then an error that blames the network). The rule below
calls a name local when it could only be a path, or when the user clearly points into a folder that is
here; a local name that does not exist is then refused at once. A name is local when

1. it exists on disk (a folder or a file), or
2. it starts with `/`, `~`, `./` or `../` (or is `.` or `..`), or ends with `/`, or
3. it has more than one `/` (a hub name is `name` or `owner/name`), or
4. its first component exists on disk (`output/nope` where `output/` is here), or
5. it is not a valid hub name (spaces, `..`, `--`, longer than 96 characters: huggingface_hub's rule).

Anything else is a hub name, loaded from the Hugging Face cache or downloaded. Errors name the role whose
model failed (actor, critic, reference, reward, sft, chat...) and the flag that gave it.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # huggingface_hub honours either
DEFAULT_FIX = "; give a Hugging Face model folder (a step's --output_dir) or a hub name"


def looks_local(name: str) -> bool:
    """Whether `name` means a path on this machine rather than a hub name (the rule in the module docstring)."""
    path = Path(name).expanduser()
    if path.exists() or name in (".", "..") or name.startswith(("/", "~", "./", "../")) or name.endswith("/"):
        return True
    parts = name.split("/")
    if len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists()):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def who(role: str, flag: str) -> str:
    """How messages name a model: "--actor_model_name_or_path (the actor model)"."""
    return f"--{flag} (the {role} model)" if flag else f"the {role} model"


def check_model_source(name: str, role: str, flag: str = "", hint: str = "") -> str:
    """`name` as the loaders take it (`~` expanded for a local path), checked without loading anything.

    A local name (see `looks_local`) must be a folder; a hub name passes (a failed download is `hub_error`'s).
    `role` names the model in messages ("actor", "reward", "chat"...), `flag` the flag that gave it, and
    `hint` replaces the default way out ("; run step 1 first ...")."""
    if not looks_local(name):
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"{who(role, flag)}: {name} is a file, not a model folder; point at the folder holding "
                        f"config.json{hint}")
    raise UserError(f"{who(role, flag)}: no such model folder {name} (it does not exist here){hint or DEFAULT_FIX}")


def offline_vars() -> list[str]:
    """The offline-mode variables set to a true value (huggingface_hub's spelling of true)."""
    return [var for var in OFFLINE_VARS if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")]


def in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds the config.json of hub model `name`."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        return False


def hub_error(name: str, err: Exception, role: str = "") -> UserError:
    """The UserError of a model or tokenizer transformers could not load, from a local folder or the hub."""
    reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    of_role = f" of the {role} model" if role else ""
    if Path(name).expanduser().is_dir():
        return UserError(f"cannot load the model folder {name}{of_role} ({reason}); check that it is a complete "
                         "Hugging Face model folder (config.json, weights, tokenizer files)")
    offline = offline_vars()
    if offline and not in_hub_cache(name):
        settings = ", ".join(f"{var}={os.environ[var]}" for var in offline)
        return UserError(f"cannot load '{name}'{of_role}: offline mode is on ({settings}) and the "
                         f"Hugging Face cache does not hold it; unset {' and '.join(offline)} to download it once, "
                         "or pass a local model folder")
    return UserError(f"cannot load '{name}'{of_role} ({reason}); check the name, your network or HF_TOKEN, or pass "
                     "a local model folder")
