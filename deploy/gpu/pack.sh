#!/usr/bin/env bash
# Prepare what the device run carries (docs/gpu.md), in the repository root, both folders git-ignored:
#   .whl/       the wheels the device lacks: latentd itself (pure Python, built here without the packaged
#               weights, which travel in the tree; run.sh puts them in place) and the packages of
#               deploy/gpu/wheels.txt, for CPython 3.12 on x86-64 Linux;
#   .gpu-data/  the training and validation images of vae/train/configs/long.yaml and Kodak
#               (deploy/gpu/pack_data.py), made to fit beside the tree and the wheels in the 64 MiB a call carries.
# Then it prints the sizes and the one `run` call to make.
#
#   make gpu-pack        # or: bash deploy/gpu/pack.sh   (DATASETS=DIR, PYTHON=python, LIMIT_MIB=64)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DATASETS=${DATASETS:-../shared/datasets}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIMIT=$(( ${LIMIT_MIB:-64} * 1024 * 1024 ))
MARGIN=$((1024 * 1024))  # for files added before the call (a note, a fix)

# The working tree that travels: tracked files and untracked ones that git does not ignore.
tree_bytes() {
    git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

rm -rf .whl
mkdir -p .whl
echo "== wheels"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# latentd from the working tree, without vae/weights/*/*.safetensors (11 MiB that the tree carries already).
git ls-files -z -co --exclude-standard | grep -zv '^vae/weights/.*\.safetensors$' |
    xargs -0 -r cp --parents -t "$build" --
if "$PYTHON" -c "import setuptools, wheel" 2>/dev/null; then isolation=--no-build-isolation; else isolation=; fi
"$PYTHON" -m pip wheel -q --no-deps $isolation -w .whl "$build"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl -r <(grep -v '^\s*#' deploy/gpu/wheels.txt | sed 's/\s*#.*//' | grep .)
ls -l .whl | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
wheels=$(du -sb .whl | cut -f1)
tree=$(tree_bytes)

echo "== images from $DATASETS"
budget=$((LIMIT - MARGIN - tree - wheels))
"$PYTHON" deploy/gpu/pack_data.py --datasets "$DATASETS" --out .gpu-data --budget-bytes "$budget"
data=$(du -sb .gpu-data | cut -f1)

total=$((tree + wheels + data))
awk -v t="$tree" -v w="$wheels" -v d="$data" -v s="$total" -v l="$LIMIT" 'BEGIN {
    printf "== what travels: tree %.1f MiB + .whl %.1f MiB + .gpu-data %.1f MiB = %.1f MiB (limit %.0f MiB)\n",
        t / 1048576, w / 1048576, d / 1048576, s / 1048576, l / 1048576 }'
if [ "$total" -gt "$LIMIT" ]; then
    echo "over the limit: commit or ignore less, or lower the budget" >&2
    exit 1
fi
cat <<'EOF'
== the one device call (ask `status` first; docs/gpu.md):
run(command="bash deploy/gpu/run.sh", carry=[".whl", ".gpu-data"], timeout_s=600)
EOF
