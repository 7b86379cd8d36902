"""Reliability and security tests of the serving stack against real TorchServe servers (see conftest.py)."""
