"""Structured outputs: grammars (llguidance) that constrain what a sequence may sample."""
