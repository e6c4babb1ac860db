#!/usr/bin/env bash
# The test suite on CUDA (bf16 included), then a timing of the wrapper beside the baselines on the default workloads.
# Run from the repository root on a machine with a GPU, torch and triton (and flashinfer for its columns):
#   bash scripts/gpu_check.sh [bench_decode.py args...]
# Results land in $OUT (default ./out): pytest.log, bench_decode.{csv,json,png,log}, and where the time goes:
# profile_plan.log (plan()'s host time per phase on this host) and profile_decode.log (each kernel of a replay).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; assert torch.cuda.is_available(), "no GPU"; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
python3 -m pytest -q -n "${PYTEST_WORKERS:-8}" -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}
python3 scripts/bench_decode.py --refcheck --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_decode.log"
bench_rc=${PIPESTATUS[0]}
python3 scripts/profile_plan.py 2>&1 | tee "$OUT/profile_plan.log"
profile_rc=${PIPESTATUS[0]}
python3 scripts/profile_decode.py --workload single_long system_prompt tree_of_thought 2>&1 | tee "$OUT/profile_decode.log"
profile_rc=$(( profile_rc || PIPESTATUS[0] ))
echo "pytest rc=$tests_rc bench rc=$bench_rc profiles rc=$profile_rc"
exit $(( tests_rc || bench_rc || profile_rc ))
