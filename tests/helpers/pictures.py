"""A tiny random text-to-image pipeline, built in code (nothing is downloaded), and a
fake OpenAI-compatible image service: what the illustration tests draw with."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from aiohttp import web


def tiny_pipeline(folder: Path) -> Path:
    """A Stable Diffusion pipeline with random weights a few hundred kB large, saved to
    `folder` (any diffusers pipeline folder is what STORY_IMAGE_MODEL names)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokens = folder / "tokenizer-files"
    tokens.mkdir(parents=True, exist_ok=True)
    # A byte-level vocabulary with no merges: every text tokenizes, one byte a token.
    characters = _byte_characters()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in characters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tokens / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (tokens / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    tokenizer = CLIPTokenizer(
        str(tokens / "vocab.json"), str(tokens / "merges.txt"), model_max_length=32
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def _byte_characters() -> list[str]:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's table, which CLIP's
    tokenizer uses)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(kept)
    n = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


class FakeImageService:
    """`POST /v1/images/generations` as OpenAI specifies it: answers with a small PNG
    (as b64_json, or as a link when asked for `url`), records every request, and fails
    loudly on anything else. `answer` replaces the JSON answer (to test bad services)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.answer: Any = None
        self.status = 200
        self.response_format = "b64_json"
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeImageService:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._generate)
        app.router.add_get("/files/picture.png", self._file)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        assert isinstance(body.get("prompt"), str) and body["prompt"], body
        if self.answer is not None:
            return web.json_response(self.answer, status=self.status)
        if self.response_format == "url":
            return web.json_response(
                {"created": 0, "data": [{"url": f"{self.url}/files/picture.png"}]}
            )
        data = base64.b64encode(png_bytes()).decode()
        return web.json_response({"created": 0, "data": [{"b64_json": data}]})

    async def _file(self, request: web.Request) -> web.Response:
        return web.Response(body=png_bytes(), content_type="image/png")
