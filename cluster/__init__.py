"""Composition root: configuration, the Ray Serve application and the exaone-cluster CLI."""
