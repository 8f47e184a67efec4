"""Routed experts held apart from the attention replica: placement, dispatch, an expert
group's work."""
