#!/usr/bin/env bash
# The GPU checks privasr cannot run on its CPU-only machines, as one short script for a lent GPU machine:
#   bash tools/device_check.sh            (from the repository root; about 5 minutes on one H200)
# 1. the equivalence tests (N processes = one process emulating N cores = the reference) with NCCL on the GPUs;
# 2. privasr-bench ratios (none / DDP / PCC / APCC / PEC) in fp32 and bf16, with the flat all-reduce in fp32.
# Everything it prints is also written under ${OUT:-device_check_out}/ (logs, bench JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device_check_out}; mkdir -p "$out"
python=python3; [ -x .venv/bin/python ] && python=.venv/bin/python
[ -x .venv/bin/python ] || { bash setup.sh > "$out/setup.log" 2>&1 || { echo "setup failed: $out/setup.log"; exit 1; }; python=.venv/bin/python; }
gpus=$($python -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $gpus; $($python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')"
[ "$gpus" -ge 1 ] || { echo "no GPU: nothing to check here (the CPU suite is README's test command)"; exit 1; }
nproc=$(( gpus >= 2 ? 2 : 1 ))

# 1. equivalence on CUDA: NCCL across 2 GPUs when there are 2, else one process emulating the 4 cores
if [ "$nproc" -ge 2 ]; then
  timeout 600 $python -m torch.distributed.run --standalone --nproc_per_node 2 tools/device_equivalence.py
else
  timeout 600 $python tools/device_equivalence.py
fi 2>&1 | tee "$out/equivalence.log" | tail -n 40
# the CPU suite's exactness tests, now with CUDA visible (they run on the CPU; bf16 autocast included)
timeout 900 $python -m pytest -q tests/test_clipping.py tests/test_speedups.py tests/test_sb_options.py \
  2>&1 | tee "$out/pytest.log" | tail -n 3

# 2. step time and memory, ratios to `none`, fp32 then bf16 (mini-sized model, 16 utterances per process)
for precision in fp32 bf16; do
  timeout 900 $python -m privasr.cli.bench_clipping --nproc "$nproc" --batch 16 --seconds 8 --tokens 60 --d-model 144 \
    --layers 4 --heads 4 --steps 20 --warmup 3 --precision "$precision" \
    --strategies ddp none pcc apcc pcc-v4 pec-vmap pec-loop --json "$out/bench_$precision.json" \
    2> "$out/bench_$precision.log" | tee "$out/bench_$precision.md"
done
echo "done: $out/"
