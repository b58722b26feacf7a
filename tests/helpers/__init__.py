"""Test helpers: synthetic files and victims, CLI shortcuts, callbacks. Imported by tests and conftest.py alike."""
