# GPU call: the CUDA test suite (bf16, graphs, side streams, Gluon), the long fuzz on CUDA, and the slot check's cost
# beside run on the default workloads (llama3-8b and qwen2.5-7b heads).
export PYTHONPATH=$PWD:/tmp/fi PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fi .gpu-fi/*.whl 2>&1 | grep -v WARN | tail -1
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee $OUT/env.txt
timeout 270 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_kernels.py tests/test_wrapper.py tests/test_packing.py tests/test_reliability.py tests/test_fuzz.py 2>&1 | tail -15 | tee $OUT/pytest.log
PAT_HYPOTHESIS_PROFILE=fuzz PAT_FUZZ_EXAMPLES=1500 timeout 150 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_fuzz.py --hypothesis-show-statistics 2>&1 | grep -E "passed|failed|error|Stopped|examples|test_fuzz|Events|%" | tail -70 > $OUT/fuzz.log
timeout 170 python3 scripts/bench_decode.py --backends pat flashinfer --rep-ms 60 --plan-reps 20 --out $OUT 2>&1 | grep -v -i warn | tail -22 | tee $OUT/bench.log
tail -3 $OUT/fuzz.log
