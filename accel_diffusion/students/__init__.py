"""One-step students: the shared distillation loop and one file per method (spec: students-parallel-stream.md)."""
