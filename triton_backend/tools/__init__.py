"""Development tooling: deterministic default models and adapters, benchmark helpers, workload traces."""
