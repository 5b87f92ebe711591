#!/usr/bin/env bash
# GPU check of this session's conv work on the device machine.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
mkdir -p /tmp/site/lora_jax-0.1.0.dist-info && printf 'Metadata-Version: 2.1\nName: lora_jax\nVersion: 0.1.0\n' > /tmp/site/lora_jax-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import jax, torch, peft; print(jax.__version__, jax.devices(), torch.__version__, peft.__version__)"
nvidia-smi --query-gpu=name --format=csv,noheader
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.1
timeout 330 python3 -m pytest -q -o addopts="-ra" -n 8 -p no:cacheprovider tests/test_layers.py tests/test_peft.py -k "lokr or loha or dora or conv or embedding" 2>&1 | tail -15
unset XLA_PYTHON_CLIENT_MEM_FRACTION
for m in lora dora loha lokr; do
  r=8; [ $m = loha ] && r=4
  timeout 60 python3 benchmarks/conv_step.py --method $m --rank $r --batch 128 --width 128 --size 32 --runs 20 2>&1 | tail -3
done
