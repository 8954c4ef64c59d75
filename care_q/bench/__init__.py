"""Latency measurement (`host`, `latency`, `memory`) and the `make bench` suite (`suite`).

The suite, one job per module: `schema` reads ``eval/suite.yaml``; `steps` caches each step under
keys from `keys` (digests of the code and inputs a step depends on); `artifacts` makes one model's
FP32, care-q and baseline artifacts, for both `accuracy` (evaluated on the trained proxy) and
`latency_suite` (timed by `host`); `qat_steps`, `ptq_time` and `npu` are the other sections;
`targets` builds the table's rows and checks; `benchmarks` renders ``eval/BENCHMARKS.md``.
"""
