"""Capture, TopK-SAE training and decoder-only adaptation (SafeDIG parts 1, 2 and 5)."""
