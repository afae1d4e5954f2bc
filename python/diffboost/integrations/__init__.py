"""Integrations with diffusers: each feature's config and its install/uninstall on a model."""
