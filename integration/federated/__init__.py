"""The federated server and the model helpers every app shares.

:mod:`.server`: the framework-free server state and round policy; :mod:`.models`: loading,
the shared initial adapter, local training, evaluation (Hugging Face and peft).
"""
