//! Multi-process tests of `cluster`: fixture binaries in `src/bin`, tests in `tests/`.
