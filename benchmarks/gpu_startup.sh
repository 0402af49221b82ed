#!/usr/bin/env bash
# Where the time of a run goes on the two-GPU node, before and between kernels (carry .whl): torchrun's own start
# (c10d vs static rendezvous), a rank's steps before its first measurement, import times, a quick run's phases,
# and a cProfile of every rank of a quick run. Everything lands in $OUT/startup.tgz and $OUT/summary.txt.
set -u
source .whl/gpu_env.sh > /tmp/gpu_env.txt 2>&1
python3 -m pip install -q --no-build-isolation -e . > /tmp/pip.txt 2>&1 || { cat /tmp/pip.txt; exit 1; }
S=$OUT/startup; mkdir -p $S
t() { local s=$(date +%s%N); "$@" > /dev/null 2>&1; echo "$(( ($(date +%s%N) - s) / 1000000 )) ms: $*"; }
{
  for i in 1 2; do
    t python3 -c pass
    t python3 -c "import torch"
    t python3 -m torch.distributed.run --standalone --nproc_per_node 2 --no-python true
    t python3 -m torch.distributed.run --nnodes 1 --node-rank 0 --master-addr 127.0.0.1 --master-port 29561 \
      --nproc_per_node 2 --no-python true
  done
  python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/startup_probe.py --deep-ep 2>&1 | grep ' s '
} | tee $S/startup.txt
python3 -X importtime -c "import deepep_tune.tune.run, deep_ep" 2> $S/importtime.txt
sort -t'|' -k2 -n $S/importtime.txt | tail -25 > $S/importtime_top.txt
for i in 1 2; do
  ./run.sh 2 quick --model deepseek-v3 --out-dir /tmp/q$i > $S/quick$i.txt 2>&1
  python3 -c "import json,glob; r=json.load(open(glob.glob('/tmp/q$i/RESULTS_EP2.json')[0])); print('quick$i', r['phases_s'], r['num_measurements'])" | tee -a $S/startup.txt
done
cp /tmp/q1/logs/*.jsonl $S/quick1_log.jsonl
python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/profile_rank.py --out $S/prof \
  --mode quick --model deepseek-v3 --out-dir /tmp/qp > $S/prof_console.txt 2>&1
echo "profile rc=$?" | tee -a $S/startup.txt
tar czf $OUT/startup.tgz -C $OUT startup
cp $S/startup.txt $OUT/summary.txt
