"""renderfarm.v1: the wire protocol (generated from farm.proto; regenerate with generate.py)."""
