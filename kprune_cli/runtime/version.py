"""kprune's version (pyproject.toml's), kept apart so that the report can name it without importing the
package root, which loads the Python API lazily."""

__version__ = "0.1.0"
