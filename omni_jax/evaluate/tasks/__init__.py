"""One module per evaluator; each registers itself with omni_jax.evaluate.registry under its name."""
