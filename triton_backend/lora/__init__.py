"""Bounded asynchronous LoRA loading (DESIGN.md §2): store, conversion, in-place patching, manager stage."""
