from omni_jax.convert.cli import main

if __name__ == "__main__":
  main()
