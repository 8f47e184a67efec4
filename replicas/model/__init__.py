"""The EXAONE-MoE model (layers, MoE, MTP), its config, and the loader that builds it from a
checkpoint."""
