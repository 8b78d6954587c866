"""Bounded asynchronous LoRA loading (docs/architecture.md): store, conversion, in-place patching, manager stage."""
