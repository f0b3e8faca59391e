//! Benchmarks of `cluster`: criterion micro-benchmarks and the load benchmark.
