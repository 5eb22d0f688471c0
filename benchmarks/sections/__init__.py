"""The sections of `python -m benchmarks.run`, one module each; their published reports live
beside this folder (RESULTS.md, RESULTS-gpu.md), written by `run --publish`."""
