"""Triton glue: the model classes, tensor I/O and BLS, the embedded server, the CLI, perf_analyzer, stage events."""
