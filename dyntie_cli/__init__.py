"""dyntie: train transformers with dynamic layer tying (David-Hay & Wolf, ICLR 2024)."""

__version__ = "0.1.0"
