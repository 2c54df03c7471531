"""Ships the top-level model cards and mesh presets inside the package.

`models/` and `meshes/` stay at the top of a checkout, where users edit them; the wheel carries
them as `flying_jax/presets/models/*.toml`, `flying_jax/presets/meshes/*.toml` and
`flying_jax/presets/meshes/hardware/*.toml`, read through importlib.resources
(`flying_jax.presets`). Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

DATA = {"flying_jax.presets.models": "models", "flying_jax.presets.meshes": "meshes",
        "flying_jax.presets.meshes.hardware": "meshes/hardware"}

setup(
    packages=find_packages(include=["flying_jax", "flying_jax.*"]) + list(DATA),
    package_dir=DATA,
    package_data={name: ["*.toml"] for name in DATA},
)
