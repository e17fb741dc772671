"""The simulated federated run and the experiment driver.

:mod:`.simulate` (configured by :mod:`.config`), :mod:`.experiment` (paired statistics in
:mod:`.stats`) and the causal-LM instruction-tuning objective (:mod:`.causal_lm`).
"""
