"""Measurement cores of the benchmarks, importable from an installed package: `edge` (the edge
runtime against llama.cpp). The scripts in benchmarks/ are thin fronts over these."""
