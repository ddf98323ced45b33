"""Datasets: sources (hub names, local files, bundled synthetic task), splits, tokenisation, cache."""
