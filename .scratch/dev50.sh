#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
mkdir -p /tmp/site/lora_jax-0.1.0.dist-info && printf 'Metadata-Version: 2.1\nName: lora_jax\nVersion: 0.1.0\n' > /tmp/site/lora_jax-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
git log -1 --format=%h 2>/dev/null
for shape in "32 64 32" "128 128 32"; do
  set -- $shape
  for p in factored merged; do
    timeout 60 python3 benchmarks/conv_step.py --method lokr --conv-path $p --batch $1 --width $2 --size $3 --runs 15 --inner 10 2>&1 | grep -E "ratio|median|method=" | tr '\n' ' '; echo
  done
  timeout 60 python3 benchmarks/conv_step.py --method lora --form peft --batch $1 --width $2 --size $3 --runs 15 --inner 10 2>&1 | grep -E "ratio|method=" | tr '\n' ' '; echo
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.1
timeout 300 python3 -m pytest -q -o addopts="-ra" -n 8 -p no:cacheprovider tests/test_layers.py tests/test_peft.py tests/test_io.py 2>&1 | tail -4
