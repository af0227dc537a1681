"""Benchmarks and load tests (`tandem bench ...`)."""
