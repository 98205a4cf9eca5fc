"""One error hierarchy for everything a user can cause.

Each `StoryError` carries a message that is safe to show to the person who caused it
(the CLI prints it, the bot sends it as an ephemeral reply). Anything that is not a
`StoryError` is a bug: front ends log it with its traceback and show a generic message.
"""

from __future__ import annotations


class StoryError(Exception):
    """Base class: the message is written for the user."""


class ConfigError(StoryError):
    """A setting is missing or malformed. The message names the variable."""


class NoActiveStory(StoryError):
    def __init__(self, channel: str) -> None:
        super().__init__("There is no story running here. Start one first.")
        self.channel = channel


class StoryEnded(StoryError):
    """An action names a story (a button on one of its messages) that is no longer the
    channel's story."""

    def __init__(self, channel: str, story_id: int) -> None:
        super().__init__(
            "That story has ended. Use the buttons on the latest story's messages, or "
            "`/story continue`."
        )
        self.channel, self.story_id = channel, story_id


class StoryAlreadyRunning(StoryError):
    def __init__(self, channel: str) -> None:
        super().__init__("A story is already running here. End it before starting a new one.")
        self.channel = channel


class NothingToUndo(StoryError):
    pass


class NothingToRetry(StoryError):
    pass


class InvalidInput(StoryError):
    """User input that cannot be used as given (too long, empty, malformed)."""


class GenerationCancelled(StoryError):
    def __init__(self, output: object | None = None, *, message: str | None = None) -> None:
        super().__init__(message or "The storyteller was stopped before finishing.")
        self.output = output
        """The partial `GenerationOutput`, when there is one."""


class GenerationFailed(StoryError):
    pass


class NotAllowed(StoryError):
    """The person acting may not do this to this story (see `storyengine.story.permissions`)."""


class NotYourTurn(NotAllowed):
    """Round-robin: someone other than the current player tried to add a line."""


class TrainingBusy(StoryError):
    def __init__(self) -> None:
        super().__init__("A training round is already running. Wait for it to finish.")


class IllustrationsOff(StoryError):
    """No image backend is configured."""

    def __init__(self) -> None:
        super().__init__(
            "Illustrations are off on this storyteller. Whoever runs it can turn them on with"
            " STORY_IMAGE_MODEL (a text-to-image model: a Hugging Face id or a local folder)"
            " or STORY_IMAGE_URL (an OpenAI-compatible image service)."
        )


class IllustratorBusy(StoryError):
    """Too many pictures are waiting to be drawn."""


class IllustrationFailed(StoryError):
    """The image backend could not draw the picture (the message says why)."""
