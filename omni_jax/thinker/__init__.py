"""The Thinker tower: its registry entry (tower), objectives (objective), inputs from a batch (inputs), converter
rules (rules) and FLOPs formula (flops). The model modules themselves live in omni_jax.models."""
