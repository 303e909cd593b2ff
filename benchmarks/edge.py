#!/usr/bin/env python
"""Edge benchmark: PLM's edge runtime against llama.cpp on the same machine, same threads
(the measurement core is plm/bench/edge.py; this is its command line).

    python benchmarks/edge.py --preset plm-1.8b --threads 2            # the full run
    python benchmarks/edge.py --quick                                   # a few minutes
    python benchmarks/edge.py --ckpt runs/my-model --data some.txt      # a trained model
    python benchmarks/edge.py --isa avx2 --llama-path DIR               # both sides as on an AVX2-only host

Writes edge.json, edge.md and edge.png in --out and prints the markdown.
"""
import argparse
import dataclasses
import sys

from plm.bench.edge import EdgeBenchSettings, run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(EdgeBenchSettings):
        if f.name == "command":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true")
        elif str(f.type).startswith("bool"):  # on/off, default decided by the run
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "data":
            ap.add_argument(flag, action="append", default=None, help="text for the quality check (repeatable)")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            ap.add_argument(flag, type=kind, default=f.default)
    args = vars(ap.parse_args())
    settings = EdgeBenchSettings(**args, command="python benchmarks/edge.py " + " ".join(sys.argv[1:]))
    _, md = run(settings)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
