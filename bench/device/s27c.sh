source bench/device/setup.sh
timeout 170 python3 -m pytest -m gpu tests/test_engine_gpu.py -k worker -p no:cacheprovider -q --tb=short 2>&1 | tail -8 | tee $OUT/tests-worker.log
python3 bench/scale.py --build-7b /tmp/llama7b --tokenizer scratch/tok7b/tokenizer 2>&1 | tail -2
export RANA_DEVICE=cuda
start=$(date +%s)
timeout 360 python3 -m rana_cli.main compress --model /tmp/llama7b --method hybrid --flop-reduction 0.44 --dtype bfloat16 \
  --no-layer-by-layer --max-gpu-memory 64 --calib-tokens 4096 --eval-tokens 4096 --no-probes --json $OUT/hybrid-7b-cap64.json \
  > $OUT/hybrid-7b-cap64.log 2>&1; echo "rc $? in $(( $(date +%s) - start )) s"
tail -c 1500 $OUT/hybrid-7b-cap64.log
python3 -c "import json;d=json.load(open('$OUT/hybrid-7b-cap64.json'));print({k:d.get(k) for k in ('measured_flop_reduction','perplexity','dense_perplexity')}, d.get('environment'))" 2>&1 | tail -3
