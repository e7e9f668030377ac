"""Benchmarks of sslpipe against its peers (issue 6); run with ``python -m benchmarks.run``."""
