WHL=scratch/whl-lite source bench/device/setup.sh
timeout 240 python3 bench/mlp_blocks.py --blocks 64-64-128-2-4-2-0/64-64-128-2-4-2-1/32-64-128-2-4-2-1/32-128-128-2-4-2-1/64-128-128-2-8-2-1/64-64-128-4-4-2-1/64-64-128-1-4-2-1/128-64-128-4-8-2-1/32-64-128-2-4-2-0/64-64-128-2-4-3-1 --out $OUT/mlp-blocks.json 2>&1 | tee $OUT/bench.log
timeout 150 python3 -m pytest -m gpu tests/test_mlp_blocks.py -p no:cacheprovider -q --tb=short 2>&1 | tail -15 | tee $OUT/tests-blocks.log
timeout 190 python3 -m pytest -m gpu tests/test_engine_gpu.py -k "not smollm2" -p no:cacheprovider -q --tb=short -x 2>&1 | tail -15 | tee $OUT/tests-auto.log
