"""Hypothesis property suite of glora-math."""
