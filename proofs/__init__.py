"""Symbolic proofs and high-precision checks of the SPEC propositions."""
