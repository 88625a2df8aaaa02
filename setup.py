"""Package discovery for setuptools (everything else is in pyproject.toml).

``configs/`` is installed as ``kprune_cli/configs`` (pyproject.toml's ``package-dir``), so that a
non-editable install finds it too (kprune_cli/config/paths.py). Its config groups hold only YAML;
setuptools counts such directories as packages and warns about each one not declared, so every
directory is found here: a new sub-package or config group ships without editing a list.
kprune's Hydra launchers are ``hydra_plugins.kprune_launchers`` (Hydra takes launchers only from
its ``hydra_plugins`` namespace package).
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(packages=[*find_packages(include=["kprune_cli", "kprune_cli.*"]),
                *find_namespace_packages(include=["hydra_plugins.kprune_launchers"]),
                *("kprune_cli." + name for name in find_namespace_packages(include=["configs", "configs.*"]))])
