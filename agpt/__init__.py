"""AGPT: aggregated-gradient pretraining on a prefix trie of the corpus."""

__version__ = "0.1.0"
