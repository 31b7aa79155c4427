"""Where a `--base` (or `--tuned`) names its checkpoint: a folder, or a Hugging Face model id.

One rule for every command and for the server: an existing folder wins; otherwise a
value of the form `ORG/NAME` is a model id, resolved through huggingface_hub's own cache
(`snapshot_download`, so `HF_HUB_OFFLINE=1` serves a cached model without a network call,
and an online machine downloads what is missing). Only what a safetensors checkpoint
needs is fetched: configs, weights, tokenizer files, chat templates; never pickles.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download

# huggingface_hub's repo id rule: letters, digits, '-', '_', '.'; no leading '-' or '.', no '--' or '..'
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def is_hub_id(value: str) -> bool:
    """Whether `value` has the form of a model id, ORG/NAME (it may still not exist)."""
    return bool(HUB_ID.match(value)) and "--" not in value and ".." not in value


def resolve_checkpoint(value: str | os.PathLike, what: str = "base") -> Path:
    """The local folder of a checkpoint given as a folder or as a Hugging Face model id.

    `what` names the argument in messages ("base", "tuned"). Raises ValueError with one
    sentence naming the value when it is neither an existing folder nor a cached (or, when
    online, downloadable) model id.
    """
    path = Path(value)
    if path.is_dir():
        return path
    text = os.fspath(value)
    if not is_hub_id(text):
        raise ValueError(f"the {what} '{text}' is not a folder, nor a Hugging Face model id of the form "
                         "ORG/NAME; expected a checkpoint folder or a model id.")
    offline = constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(text, allow_patterns=CHECKPOINT_FILES, local_files_only=offline))
    except (OSError, ValueError) as e:
        where = f"in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        how = ("HF_HUB_OFFLINE is set: download it first (`hf download " + text + "`) or unset it"
               if offline else f"the Hub answered: {str(e).splitlines()[0][:200]}")
        raise ValueError(f"the {what} '{text}' is not a folder and the model {text} is not {where}; {how}.") from e


def checkpoint_name(folder: str | os.PathLike) -> str:
    """A display name for a checkpoint folder: the model id's NAME for a hub cache snapshot
    (`models--ORG--NAME/snapshots/<commit>`), else the folder's own name."""
    path = Path(folder).resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name
