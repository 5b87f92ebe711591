#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
mkdir -p /tmp/site/lora_jax-0.1.0.dist-info && printf 'Metadata-Version: 2.1\nName: lora_jax\nVersion: 0.1.0\n' > /tmp/site/lora_jax-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import jax; print(jax.__version__)"
for shape in "32 64 32" "128 128 32"; do
  set -- $shape
  for m in lora dora loha lokr; do
    r=8; [ $m = loha ] && r=4
    for p in factored merged; do
      timeout 60 python3 benchmarks/conv_step.py --method $m --rank $r --conv-path $p --batch $1 --width $2 --size $3 --runs 15 --inner 10 2>&1 | grep -E "ratio|median|method=" | tr '\n' ' '; echo
    done
  done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.1
timeout 200 python3 -m pytest -q -o addopts="-ra" -n 8 -p no:cacheprovider tests/test_layers.py -k "merged or lokr or rank_dropout" 2>&1 | tail -4
