"""Compute plane: the EXAONE-MoE model, weight loading and (later) the engine. No Ray here."""
