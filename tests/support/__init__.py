"""Helpers the tests share (no fixtures, no test functions): services, images, API calls, the CLI."""
