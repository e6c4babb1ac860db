# GPU call B: the kernel sweep with the slot-check column, side by side with FlashInfer decode and cascade.
export PYTHONPATH=$PWD:/tmp/fi PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fi .gpu-fi/*.whl 2>&1 | grep -v WARN | tail -1
timeout 560 python3 scripts/bench_decode.py --refcheck --backends pat flashinfer cascade --rep-ms 100 --out $OUT 2>&1 | grep -v -i warn | tail -40 | tee $OUT/bench.log
