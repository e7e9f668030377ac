"""The domain model and configuration, and the small helpers every layer uses.

The lowest layer: it imports nothing else from the library (``docs/architecture.md``).
"""
