"""Moved to `tests/synthetic.py` (one home for the tests' and benchmarks' synthetic chip tables);
kept so imports of today keep working."""

from tests.synthetic import WHEN, clustered_table, synthetic_config, write_table  # noqa: F401
