"""The benchmark harness, installed as ``recursive_benchmarks`` (``python -m recursive bench``; see ``runner``)."""
