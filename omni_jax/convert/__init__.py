"""Hugging Face <-> omni_jax checkpoint conversion (mapping tables in hf.py, command line in cli.py)."""
