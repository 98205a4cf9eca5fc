"""Stories: the engine façade and its story rules.

What a channel's story is and how it moves: turns, games, companion choices, memory,
notes and lore, the narrator that turns a story into a prompt, saves and lorebooks. It
asks `serving` for text, `storage` for records and `learning` for the adapter and the
reward model to serve; nothing below it knows stories exist.
"""
