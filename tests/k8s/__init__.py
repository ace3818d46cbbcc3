"""Tests of the Helm chart, the plain manifests in k8s/ and the Dockerfile.

A package, so that its conftest is imported as k8s.conftest and never shadows tests/conftest.py.
"""
