"""peft adapters.

Reading and writing them (:mod:`.io`) and aggregating whole adapters with the core's round
(:mod:`.aggregate`).
"""
