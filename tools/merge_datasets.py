#!/usr/bin/env python3
"""Merge indexed datasets (.bin/.idx) into one, keeping their order and document boundaries.

``--input`` takes dataset prefixes and/or directories (a directory stands for every ``*.idx`` in
it, in name order). All inputs must hold the same token dtype. The output is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from slimtron.config import ConfigError
from slimtron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def expand_prefixes(items: list[str], output_prefix: str) -> list[str]:
    prefixes: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = [p[:-len(".idx")] for p in sorted(glob.glob(os.path.join(item, "*.idx")))]
            if not found:
                raise ConfigError(f"--input {item}: directory holds no .idx files")
        else:
            found = [item[:-4] if item.endswith((".idx", ".bin")) else item]
        for prefix in found:
            if os.path.abspath(prefix) == os.path.abspath(output_prefix):
                continue  # an earlier merge into the same directory
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ConfigError(f"--input {item}: {prefix + ext} does not exist")
            if prefix not in prefixes:
                prefixes.append(prefix)
    if not prefixes:
        raise ConfigError("--input: no datasets to merge")
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    datasets = [IndexedDataset(p) for p in prefixes]
    dtype = datasets[0].dtype
    for prefix, ds in zip(prefixes, datasets):
        if ds.dtype != dtype:
            raise ConfigError(f"--input {prefix}: token dtype {ds.dtype} differs from "
                              f"{dtype} of {prefixes[0]}")
    del datasets  # release the memory maps before the merge reads the files again
    # The context manager finalizes (renaming the temporary files into place) or cleans up.
    with IndexedDatasetBuilder(output_prefix, dtype, temp_suffix=f".tmp{os.getpid()}") as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
    return IndexedDataset(output_prefix)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_PREFIX")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input, args.output_prefix)
        merged = merge(prefixes, args.output_prefix)
    except ValueError as err:  # ConfigError, or a corrupt input
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output_prefix}: merged {len(prefixes)} datasets, {len(merged)} sequences, "
          f"{merged.num_documents} documents, {merged.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
