"""jaxalign: align language models with self-generated preference data (SPA, PLE) in JAX."""

__version__ = "0.1.0"
