#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 .scratch/conv_diag3.py 128 128 32
timeout 150 python3 .scratch/conv_diag3.py 32 64 32
timeout 150 python3 .scratch/conv_diag3.py 64 256 16
