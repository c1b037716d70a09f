"""Fused preference losses, one module per family."""
