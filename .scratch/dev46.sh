#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
mkdir -p /tmp/site/lora_jax-0.1.0.dist-info && printf 'Metadata-Version: 2.1\nName: lora_jax\nVersion: 0.1.0\n' > /tmp/site/lora_jax-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
timeout 250 python3 .scratch/conv_diag.py 128 128 32
timeout 200 python3 .scratch/conv_diag.py 32 64 32
