"""Package discovery; everything else is in pyproject.toml.

Every package is found, none is listed: terdit_jax/ and its subpackages as they are, and two top-level folders
under other names: kernels/ as `terdit_kernels` (a top-level `kernels` would clash with an unrelated PyPI
package) and configs/ as `terdit_jax.configs` (so the demo config is found after a plain install).
"""
from setuptools import find_packages, setup

RENAMED = {"kernels": "terdit_kernels", "configs": "terdit_jax.configs"}


def renamed(folder: str, name: str) -> dict[str, str]:
    """{package name: folder} of `folder` and its subpackages, installed under `name`."""
    subs = [folder] + [f"{folder}.{p}" for p in find_packages(folder)]
    return {name + p[len(folder):]: p.replace(".", "/") for p in subs}


package_dir = {k: v for folder, name in RENAMED.items() for k, v in renamed(folder, name).items()}
setup(packages=find_packages(include=["terdit_jax", "terdit_jax.*"]) + sorted(package_dir), package_dir=package_dir)
