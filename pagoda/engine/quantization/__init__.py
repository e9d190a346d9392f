"""Quantized weights and the linear layers that run them (see weights.py for the common form)."""
