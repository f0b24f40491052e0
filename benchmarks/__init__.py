"""Benchmarks: each prints a table and writes JSON under benchmarks/results/."""

import openlora  # noqa: F401  (first: it sets how gRPC handles fork before grpc is imported)
