"""gxpo-kernels benchmark suite: pytest-benchmark files ``bench_*.py``, the roofline model (``roofline.py``),
the driver (``python -m bench``, ``run.py``) and the README table generator (``readme_table.py``)."""
