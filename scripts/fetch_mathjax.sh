#!/usr/bin/env bash
# Vendor MathJax for the docs, so that their formulas render offline.
#
# Fetches the npm package once into ~/.cache/sliceout_fx/mathjax-$VERSION (the test suite renders
# every formula of the built site with its node entry point) and copies the one self-contained
# browser bundle the site loads (SVG output: no font files) to docs/javascripts/vendor/, which
# git ignores. Idempotent; needs npm.
set -euo pipefail

VERSION=3.2.2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SLICEOUT_FX_MATHJAX:-$HOME/.cache/sliceout_fx/mathjax-$VERSION}"
TARGET="$ROOT/docs/javascripts/vendor/mathjax"

if [ ! -f "$CACHE/es5/node-main.js" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack -q "mathjax@$VERSION" >/dev/null && tar -xzf "mathjax-$VERSION.tgz")
    mkdir -p "$(dirname "$CACHE")"
    rm -rf "$CACHE"
    mv "$work/package" "$CACHE"
fi
mkdir -p "$TARGET"
cp "$CACHE/es5/tex-svg.js" "$TARGET/tex-svg.js"
echo "MathJax $VERSION: $TARGET/tex-svg.js (package in $CACHE)"
