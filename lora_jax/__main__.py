"""`python -m lora_jax inspect FILE_OR_DIR` and `python -m lora_jax convert SRC DST`."""

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from ._io import read_adapter_file
from ._peft import (
    CONFIG_NAME,
    _rank_alpha,
    _split_key,
    lora_jax_file_to_peft,
    method_for_config,
    peft_to_lora_jax_file,
    read_peft_dir,
)


def _describe(path: str) -> dict:
    """What an adapter file or PEFT directory holds, without a model."""
    if os.path.isdir(path):
        config, tensors = read_peft_dir(path)
        method = method_for_config(config, os.path.join(path, CONFIG_NAME))
        suffixes = list(method.suffixes)
        modules, adapter_params, other = set(), 0, 0
        for key, arr in tensors.items():
            _, module, _ = _split_key(key, suffixes, path)
            if module is None:
                other += arr.size
                continue
            adapter_params += arr.size
            modules.add(module)
        targets = {m: _rank_alpha(config, method, m)[0] for m in sorted(modules)}
        d = {
            "format": "peft",
            "method": method.method,
            "peft_type": config.get("peft_type"),
            "rank": config.get(method.rank_key),
            "alpha": config.get(method.alpha_key),
        }
        if method.rslora:
            d["use_rslora"] = bool(config.get("use_rslora", False))
        if method.method == "lokr":
            d["decompose_both"] = config.get("decompose_both", False)
            d["decompose_factor"] = config.get("decompose_factor", -1)
        d.update(
            targets=targets,
            adapter_parameters=int(adapter_params),
            other_parameters=int(other),
            bias=config.get("bias", "none"),
            modules_to_save=config.get("modules_to_save"),
        )
        return d
    tensors, metadata, info, extras = read_adapter_file(path)
    adapter_params = 0
    for name, entry in info.items():
        if entry["method"] == "multi_lora":
            # Count each stacked adapter at its true rank, not the padded one.
            a, b = tensors[f"{name}.a"], tensors[f"{name}.b"]
            n, padded = a.shape[0], a.shape[-1]
            per_rank = (a.size + b.size) // (n * padded)
            adapter_params += per_rank * sum(entry.get("ranks", [padded] * n))
            continue
        adapter_params += sum(
            int(arr.size)
            for key, arr in tensors.items()
            if key.startswith(name + ".") and key.rpartition(".")[2] != "scaling"
        )
    d = {
        "format": "lora_jax",
        "format_version": int(metadata["format_version"]),
        "lora_jax_version": metadata.get("lora_jax_version"),
        "method": metadata.get("method"),
        "rank": json.loads(metadata.get("rank", "null")),
        "scaling": json.loads(metadata.get("scaling", "null")),
    }
    if "adapter_names" in metadata:
        d["adapter_names"] = json.loads(metadata["adapter_names"])
    d.update(
        targets={name: e.get("rank") for name, e in info.items()},
        adapter_parameters=int(adapter_params),
        other_parameters=int(sum(np.asarray(tensors[n]).size for n in extras)),
        train_bias=metadata.get("train_bias"),
        trainable=json.loads(metadata.get("trainable", "null")),
    )
    return d


def _print_description(d: dict, out) -> None:
    width = max(len(k) for k in d)
    for key, value in d.items():
        if key == "targets":
            print(f"{'targets':<{width}}  {len(value)} modules", file=out)
            for name, rank in value.items():
                print(f"{'':<{width}}    {name}  (rank {rank})", file=out)
        else:
            print(f"{key:<{width}}  {value}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_jax", description="Inspect and convert LoRA adapter files."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect", help="describe a lora_jax .safetensors file or a PEFT adapter directory"
    )
    p.add_argument("path", metavar="FILE_OR_DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    c = sub.add_parser(
        "convert",
        help="convert between a lora_jax .safetensors file and a PEFT adapter directory",
        description="SRC a directory (PEFT) writes the lora_jax file DST; SRC a file "
        "(lora_jax) writes the PEFT directory DST.",
    )
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--rslora", action="store_true", help="write use_rslora=True (to PEFT)")
    c.add_argument(
        "--adapter",
        metavar="NAME",
        help="from a file of stacked adapters, the one to write (to PEFT)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            d = _describe(args.path)
            if args.json:
                print(json.dumps(d, indent=2))
            else:
                _print_description(d, sys.stdout)
        else:
            if not os.path.exists(args.src):
                raise FileNotFoundError(f"No such file or directory: {args.src!r}.")
            if os.path.isdir(args.src):
                if os.path.isdir(args.dst):
                    raise ValueError(
                        f"DST {args.dst!r} is a directory; converting PEFT to lora_jax writes a "
                        ".safetensors file."
                    )
                if args.adapter is not None:
                    raise ValueError("--adapter applies when converting a lora_jax file to PEFT.")
                peft_to_lora_jax_file(args.src, args.dst)
            else:
                if os.path.isfile(args.dst):
                    raise ValueError(
                        f"DST {args.dst!r} is a file; converting lora_jax to PEFT writes a "
                        "directory."
                    )
                lora_jax_file_to_peft(args.src, args.dst, rslora=args.rslora, adapter=args.adapter)
            print(f"wrote {args.dst}")
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
