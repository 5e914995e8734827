"""Config files; installed as the package `terdit_jax.configs` so the demo default is found after `pip install`."""
