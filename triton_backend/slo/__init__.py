"""SLO-aware step scheduling (DESIGN.md §5): admission control, deadline order and step-boundary preemption for
every generation of a ``denoise`` instance; ``policy.py`` decides (pure), ``engine.py`` applies it on the event loop.
"""
