"""End-to-end tests use the ``cluster`` fixture of ``tests/conftest.py``."""
