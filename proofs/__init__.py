"""Executable proofs of the theory (proofs/README.md): one module per statement, with the
statement in its docstring, a derivation in the markdown file beside it, and a
Hypothesis check together with a deliberately wrong variant that the check catches.
See README.md for the list.
"""
