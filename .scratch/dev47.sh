#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 .scratch/conv_diag2.py 2>&1 | sort | uniq -c | sort -rn | head -60
