"""SLO-aware step scheduling (docs/architecture.md "Scheduling under load"): admission control, deadline order and
step-boundary preemption for every generation of a ``denoise`` instance; ``policy.py`` decides (pure), ``engine.py``
applies it on the event loop.
"""
