"""Illustrations: the prompt written from a turn and its lore, both backends (a tiny
random diffusers pipeline built in code, a fake image service), the queue, and the
refusals."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from storyengine.config import Settings
from storyengine.errors import (
    ConfigError,
    IllustrationFailed,
    IllustrationsOff,
    IllustratorBusy,
    InvalidInput,
    NotAllowed,
)
from storyengine.records import Author, LoreCard, Story, Turn
from storyengine.safety import SafetyFilter
from storyengine.sampling import SamplingParams
from storyengine.serving.images import (
    LocalPictures,
    PictureRequest,
    RemotePictures,
    images_endpoint,
    make_picture_backend,
    media_type,
)
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.story.engine import StoryEngine
from storyengine.story.illustrations import picture_prompt
from tests.conftest import settings_for
from tests.helpers.models import make_tiny_model
from tests.helpers.pictures import FakeImageService, tiny_pipeline

ANN = Author("u1", "Ann")
BEN = Author("u2", "Ben")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


def story(genre: str | None = None) -> Story:
    return Story(1, "c", "p", genre, "solo", "active", "", "", None, None, "", None)


def turn(text: str) -> Turn:
    return Turn(1, 1, 0, 0, "bot", None, None, text, "active", None)


def test_the_prompt_puts_the_scene_first_then_who_is_in_it_then_the_style():
    lore = [
        LoreCard("Rusty", ("rusty", "fox"), "A red fox with a torn ear. He hoards buttons."),
        LoreCard("Mill", ("mill",), "An old mill by the river."),
    ]
    text = "Rusty ran to the river. The water was cold. He shivered. " + "More. " * 80
    prompt = picture_prompt(story("spooky"), turn(text), lore, "soft colours")
    assert prompt.startswith("Rusty ran to the river. The water was cold. He shivered")
    assert "Rusty: A red fox with a torn ear" in prompt
    assert "hoards" not in prompt  # a card's first sentence only
    assert "Mill" not in prompt  # not named in the turn
    assert prompt.endswith("A spooky story. Soft colours.")
    assert len(prompt) < 450
    # "He" in a turn is whoever the turn before named.
    later = picture_prompt(story(), turn("He swam across."), lore, "", turn("At the mill, Rusty"))
    assert later == (
        "He swam across. Rusty: A red fox with a torn ear. Mill: An old mill by the river."
    )


def test_the_prompt_passes_the_safety_filter_blocked_words_dropped_whole():
    safety = SafetyFilter(blocklist=["gore"])
    cleaned = safety.clean_picture_prompt("A <|endoftext|> fox, GORE and @everyone <@123>.")
    assert "gore" not in cleaned.lower() and "*" not in cleaned
    assert "<|endoftext|>" not in cleaned
    assert "@everyone" not in cleaned and "<@123>" not in cleaned
    assert cleaned.startswith("A fox,")


@pytest.fixture
async def drawing_engine(database, tmp_path, pipeline_dir):
    settings = settings_for(
        database,
        tmp_path,
        sampling=SamplingParams(max_new_tokens=8, seed=1),
        image_model=str(pipeline_dir),
        image_size=32,
        image_steps=3,
        blocklist=("gore",),
    )
    async with StoryEngine(settings, generator=BatchingGenerator(make_tiny_model())) as engine:
        yield engine


async def test_a_turn_is_drawn_by_the_local_pipeline_with_progress(drawing_engine):
    engine = drawing_engine
    await engine.start_story("c", "Once upon a time, a fox.", author=ANN)
    await engine.add_lore("c", "Rusty", "fox", "A red fox with a gore-stained ear.", by=ANN)
    await engine.continue_story("c", ANN, "The fox ran home.")
    steps: list[tuple[int, int]] = []
    drawn = await engine.illustrate("c", 2, by=ANN, on_progress=lambda d, n: steps.append((d, n)))
    assert media_type(drawn.picture.data) == "image/png"
    assert Image.open(io.BytesIO(drawn.picture.data)).size == (32, 32)
    assert (drawn.order.turn, drawn.order.turns) == (2, 3)
    assert drawn.order.prompt.startswith("The fox ran home. Rusty: A red fox with a")
    assert "gore" not in drawn.order.prompt
    await asyncio.sleep(0)  # progress arrives through the event loop
    assert steps[0] == (0, 3) and steps[-1] == (3, 3)

    last = await engine.illustrate("c", by=ANN)  # the default: the last turn
    assert last.order.turn == 3
    for bad in (0, 4):
        with pytest.raises(InvalidInput, match="pick a turn from 1 to 3"):
            await engine.order_picture("c", bad, by=ANN)


async def test_only_the_companion_may_illustrate_their_story(drawing_engine):
    engine = drawing_engine
    await engine.start_story("dm", "Once upon a time, a fox.", author=ANN, mode="companion")
    with pytest.raises(NotAllowed):
        await engine.order_picture("dm", by=BEN)
    assert (await engine.order_picture("dm", by=ANN)).turn >= 1


async def test_illustrations_are_off_until_configured_and_say_how(tiny_engine):
    await tiny_engine.start_story("c", "Once upon a time, a fox.", author=ANN)
    with pytest.raises(IllustrationsOff, match=r"STORY_IMAGE_MODEL .* STORY_IMAGE_URL"):
        await tiny_engine.illustrate("c", by=ANN)


async def test_the_queue_refuses_past_its_bound_and_a_cancelled_draw_frees_the_thread(
    pipeline_dir,
):
    pictures = LocalPictures(str(pipeline_dir), device="cpu", waiting=0)
    try:
        request = PictureRequest("a fox", 32, 32, steps=3)
        first = asyncio.create_task(pictures.draw(request))
        await asyncio.sleep(0)
        with pytest.raises(IllustratorBusy, match="busy"):
            await pictures.draw(request)
        assert media_type((await first).data) == "image/png"

        # A draw whose asker goes stops at its next step; the next one is drawn.
        started = asyncio.Event()
        slow = PictureRequest("a fox", 32, 32, steps=200)
        task = asyncio.create_task(pictures.draw(slow, on_progress=lambda d, n: started.set()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await asyncio.wait_for(pictures.draw(request), 60)
        assert media_type(again.data) == "image/png"
    finally:
        await pictures.close()


async def test_the_remote_backend_speaks_the_openai_images_protocol():
    async with FakeImageService() as service:
        pictures = RemotePictures(service.url, api_key="sk-secret", model="tiny")
        try:
            drawn = await pictures.draw(PictureRequest("a fox", 256, 256, seed=5))
            assert media_type(drawn.data) == "image/png" and drawn.extension == "png"
            sent = service.requests[-1]
            assert sent["prompt"] == "a fox" and sent["size"] == "256x256"
            assert sent["model"] == "tiny" and sent["response_format"] == "b64_json"
            assert service.headers[-1]["Authorization"] == "Bearer sk-secret"

            service.response_format = "url"  # a link to the picture instead
            assert media_type((await pictures.draw(PictureRequest("a fox"))).data)

            service.answer, service.status = {"error": {"message": "prompt refused"}}, 400
            with pytest.raises(IllustrationFailed, match="answered 400: prompt refused") as err:
                await pictures.draw(PictureRequest("a fox"))
            assert "sk-secret" not in str(err.value)
            service.answer, service.status = {"data": [{"b64_json": "aGVsbG8="}]}, 200
            with pytest.raises(IllustrationFailed, match="not an image"):
                await pictures.draw(PictureRequest("a fox"))
            service.answer = {"nothing": []}
            with pytest.raises(IllustrationFailed, match="not an images response"):
                await pictures.draw(PictureRequest("a fox"))
        finally:
            await pictures.close()
    down = RemotePictures(service.url, timeout_s=5)  # the service has gone
    try:
        with pytest.raises(IllustrationFailed, match="did not answer"):
            await down.draw(PictureRequest("a fox"))
    finally:
        await down.close()


def test_the_image_settings_are_checked_and_choose_the_backend(tmp_path):
    assert images_endpoint("http://h:1") == "http://h:1/v1/images/generations"
    assert images_endpoint("http://h:1/v1/") == "http://h:1/v1/images/generations"
    assert images_endpoint("http://h/x/v1/images/generations") == "http://h/x/v1/images/generations"
    assert make_picture_backend(Settings()) is None
    assert isinstance(make_picture_backend(Settings(image_url="http://h:1")), RemotePictures)
    assert isinstance(make_picture_backend(Settings(image_model=str(tmp_path))), LocalPictures)
    with pytest.raises(ConfigError, match="set one"):
        Settings(image_model="x", image_url="http://h:1")
    with pytest.raises(ConfigError, match="STORY_IMAGE_SIZE"):
        Settings.from_env({"STORY_IMAGE_SIZE": "100"}, dotenv=False)
    with pytest.raises(ConfigError, match="STORY_IMAGE_URL"):
        Settings.from_env({"STORY_IMAGE_URL": "ftp://x"}, dotenv=False)
    shown = repr(Settings(image_url="http://h:1", image_api_key="sk-secret"))
    assert "sk-secret" not in shown


async def test_closing_stops_a_picture_being_drawn_and_says_so(pipeline_dir):
    pictures = LocalPictures(str(pipeline_dir), device="cpu")
    started = asyncio.Event()
    slow = PictureRequest("a fox", 32, 32, steps=500)
    task = asyncio.create_task(pictures.draw(slow, on_progress=lambda d, n: started.set()))
    await started.wait()
    await pictures.close()
    with pytest.raises(IllustrationFailed, match="shutting down"):
        await asyncio.wait_for(task, 30)  # at its next step, not after 500
