"""`storyengine generate` and `storyengine serve`: the model without a story."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from typing import Any

from ..config import Settings
from ..errors import InvalidInput
from .common import say_loading
from .parser import sampling_from_args

log = logging.getLogger(__name__)


def load_generator(settings: Settings) -> Any:
    from ..serving.generators import make_generator

    say_loading(settings)
    return make_generator(settings)


async def run_generate(args: argparse.Namespace, settings: Settings) -> int:
    from ..safety import SafetyFilter
    from ..story.narrator import Narrator

    params = sampling_from_args(args, settings)
    adapter = await registry_adapter(settings, args.adapter)
    generator = load_generator(settings)
    if adapter is not None:
        await generator.use_adapter(*adapter)
    model = generator.info
    safety = SafetyFilter(
        max_input_chars=max(settings.max_input_chars, len(args.prompt)),
        special_tokens=model.special_tokens,
        blocklist=settings.blocklist,
    )
    prompt = safety.clean_input(args.prompt, what="The prompt")
    ids = model.encode(prompt)
    room = model.context_window - params.max_new_tokens
    if len(ids) > room:  # keep the end of an overlong prompt: it is what gets continued
        prompt = model.decode(ids[-room:])
    try:
        narration = await Narrator(generator, safety).narrate(prompt, params)
    finally:
        await generator.close()
    print(narration.text)
    return 0


async def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """`storyengine serve`: until Ctrl-C or SIGTERM. With a database, adapter versions
    can be named and the promoted one is served by default."""

    from ..learning.registry import AdapterRegistry
    from ..serving.images import make_picture_backend
    from ..serving.service import CompletionService, serve
    from ..storage.store import Store

    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port must be 0..65535, got {args.port}")
    if args.ray:
        return await _serve_on_ray(args, settings)
    generator = await asyncio.to_thread(load_generator, settings)
    store = pictures = None
    try:
        registry = None
        if settings.has_database:  # never create a database here
            store = await Store(settings.database).open()
            registry = AdapterRegistry(store, settings.adapter_dir)
        pictures = make_picture_backend(settings.replace(image_url=None))
        service = CompletionService(
            generator,
            defaults=settings.sampling,
            registry=registry,
            pictures=pictures,
            picture_size=settings.image_size,
            picture_steps=settings.image_steps,
        )
        await service.sync_promoted()

        def ready(port: int) -> None:
            drawn = f" and pictures by {settings.image_model}" if pictures else ""
            print(
                f"serving {service.model_id}{drawn} on http://{args.host}:{port}/v1 (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )

        task = asyncio.ensure_future(serve(service, args.host, args.port, ready=ready))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        except OSError as exc:  # the port is taken, the address is not this machine's
            where = f"{args.host}:{args.port}"
            raise InvalidInput(f"cannot listen on {where}: {exc.strerror}") from None
    finally:
        await generator.close()
        if pictures is not None:
            await pictures.close()
        if store is not None:
            await store.close()
    return 0


async def _serve_on_ray(args: argparse.Namespace, settings: Settings) -> int:
    from .ray_app import Scaling, run

    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise InvalidInput("--replicas must be at least 1, --max-replicas at least --replicas")
    if not args.target_requests > 0:
        raise InvalidInput("--target-requests must be more than 0")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InvalidInput("--ray needs Ray Serve: pip install 'taleweaver[ray]'") from None
    scaling = Scaling(args.replicas, args.max_replicas, args.target_requests)
    stop = threading.Event()  # SIGTERM or Ctrl-C: the deployment and Ray go down whole
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.to_thread(run, settings, scaling, args.host, args.port, stop)
    return 0


async def registry_adapter(settings: Settings, wanted: str | None) -> tuple[str, str | None] | None:
    """What `generate` serves: the registry's promoted adapter (as the bot would), or
    `--adapter VERSION|base`. None: no registry here, the model as configured."""
    from ..serving.generation import BASE_ADAPTER

    if wanted is not None and wanted.strip().lower() == "base":
        return (BASE_ADAPTER, None)
    if not settings.has_database:  # nothing registered; never create a database here
        if wanted is not None:
            raise InvalidInput(f"{settings.db_path} does not exist: no adapter {wanted} in it.")
        return None
    from ..learning.registry import AdapterRegistry
    from ..storage.store import Store

    store = await Store(settings.database).open()
    try:
        registry = AdapterRegistry(store, settings.adapter_dir)
        if wanted is None:
            version = await registry.promoted()
        else:
            number = wanted.strip().lower().removeprefix("v")
            if not number.isdigit():
                raise InvalidInput(f"--adapter wants a version number or base, got {wanted!r}")
            version = await registry.get(int(number))
            if version is None:
                raise InvalidInput(f"There is no adapter version {number}.")
    finally:
        await store.close()
    return (version.name, str(version.path)) if version is not None else None
