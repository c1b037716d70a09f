"""Thin training loop for Hugging Face causal LMs."""
