# GPU call A: the CUDA test suite (bf16, graphs, side streams, Gluon), then the long fuzz on CUDA.
export PYTHONPATH=$PWD:/tmp/fi PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fi .gpu-fi/*.whl 2>&1 | grep -v WARN | tail -1
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee $OUT/env.txt
git rev-parse HEAD 2>/dev/null | tee -a $OUT/env.txt
timeout 330 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_kernels.py tests/test_wrapper.py tests/test_packing.py tests/test_reliability.py tests/test_fuzz.py 2>&1 | tail -15 | tee $OUT/pytest.log
PAT_HYPOTHESIS_PROFILE=fuzz timeout 200 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_fuzz.py --hypothesis-show-statistics 2>&1 | grep -v "^$" | tail -60 | tee $OUT/fuzz.log
