"""Scripts and tools beside the m3lab package, run from the repository root (a package so that
`python -m tools.tiny_m3.train` and the tests import them)."""
