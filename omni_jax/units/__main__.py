"""python -m omni_jax.units fit|encode ... (omni_jax/units/cli.py)."""

from omni_jax.units import cli

if __name__ == "__main__":
  cli.run()
