#!/usr/bin/env python
"""Edge benchmark: PLM's edge runtime against llama.cpp (see plm/bench/edge.py for the options).

    python benchmarks/edge.py --preset plm-1.8b --threads 2
    python benchmarks/edge.py --quick
"""
import sys

from plm.bench.edge import main

if __name__ == "__main__":
    sys.exit(main())
