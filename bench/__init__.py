"""lmgate's benchmark harness: a fast fake upstream, a raw-socket load client and the runner.

Run ``python -m bench.run --quick`` (see bench/README.md). Nothing here is imported by ``proxy``.
"""
