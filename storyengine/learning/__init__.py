"""Learning: from reactions to a better storyteller.

Datasets from stored feedback, the training methods (DPO, KTO, SFT), the reward model and
best-of-n scoring, the gate, rounds and their scheduling, the adapter registry, simulated
audiences and statistics. It reads feedback through `storage` and loads models through
`serving`; it never imports `story`.
"""
