"""Tiny random models built in code, and generation records for tests that need only text."""

from __future__ import annotations

from storyengine.config import bundled_model_path
from storyengine.serving.modeling import LoadedModel


def make_tiny_model(n_positions: int = 256, seed: int = 0) -> LoadedModel:
    """A 2-layer random GPT-2 with the bundled tokenizer: instant, deterministic."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    return LoadedModel(model, tokenizer, "test:tiny-gpt2", None, torch.device("cpu"))


def make_tiny_lora_model(seed: int = 0) -> LoadedModel:
    """The tiny GPT-2 with two random (non-zero) LoRA adapters, "fox" and "owl"."""
    import torch
    from peft import LoraConfig, get_peft_model

    loaded = make_tiny_model(seed=seed)
    torch.manual_seed(seed + 1)
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        "init_lora_weights": False,
    }
    model = get_peft_model(loaded.model, LoraConfig(**config), adapter_name="fox")
    model.add_adapter("owl", LoraConfig(**{**config, "r": 2}))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # large enough that each adapter changes the greedy text
            param.data.normal_(0, 0.5)
    model.eval()
    return LoadedModel(model, loaded.tokenizer, "test:tiny-gpt2+lora", "fox", loaded.device)


async def record_text(store, story_id: int, prompt: str, output: str) -> int:
    """A generation record as the engine writes one, for tests that need only its text."""
    return await store.record_generation(
        story_id=story_id,
        channel="c",
        prompt=prompt,
        output=output,
        raw_output=output,
        params={},
        model_id="m",
        adapter_id=None,
        prompt_tokens=5,
        output_tokens=5,
        finish_reason="eos",
        latency_s=0.1,
        ttft_s=0.01,
    )
