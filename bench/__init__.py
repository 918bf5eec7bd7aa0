"""pefops micro-benchmarks.

`python -m bench` runs every registered op-family benchmark (see `bench.runner.REGISTRY`) and writes
JSON rows, a Markdown table and PNG plots under bench/results/; `python -m bench.report` regenerates
the results section of README.md from those files. `pytest bench/ --benchmark-only` runs small CPU
shapes through pytest-benchmark with the same setup functions.
"""
