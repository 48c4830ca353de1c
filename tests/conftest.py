"""Shared pytest configuration.

This file's presence puts ``tests/`` on ``sys.path`` (pytest's rootdir-conftest rule), so test
modules import the shared fixtures as ``from attack_cases import ...``.
"""
