"""Wire dialects: one module per protocol, each a Sans-I/O translator to and from the core (see base.py)."""
