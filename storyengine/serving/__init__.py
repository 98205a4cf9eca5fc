"""Serving: text from a model, for whoever asks.

The `Generator` interface and its model info, the sequential and batching generators, the
scheduler's model runner, sampler, KV cache, LoRA rows and lean GPT-2 step, the HTTP
service and its remote client. It knows nothing of stories, databases or training:
nothing here imports `story`, `storage` or `learning`.
"""
