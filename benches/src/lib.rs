//! Benchmarks of `cluster`: `benches/core.rs` (criterion), `src/bin/reuseport.rs` (the plain
//! SO_REUSEPORT baseline server), `node/cluster.js` (Node's cluster), and `load/run.py`, which
//! runs them side by side and writes `docs/benchmarks.md`.
