"""The files a self-hoster deploys with agree with each other and with the README
(Docker cannot run here: these checks are what can be checked without it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def test_the_image_installs_as_the_readme_says_and_checks_its_health():
    dockerfile, readme = read("Dockerfile"), read("README.md")
    assert (
        "torch==2.13.0" in readme
        and "--extra-index-url https://download.pytorch.org/whl/cpu" in readme
    )
    assert (
        "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu ."
        in dockerfile
    )
    assert re.search(r"^USER taleweaver$", dockerfile, re.M)  # not root
    assert "VOLUME /data" in dockerfile and "WORKDIR /data" in dockerfile
    command = dockerfile.split("\nCMD ", 1)[1]
    # The defaults hold even when an --env-file from .env.example sets them empty.
    assert 'STORY_DATA_DIR=\\"${STORY_DATA_DIR:-/data}\\"' in command
    assert "exec taleweaver-bot" in command
    port = re.search(r"BOT_HEALTH_PORT=(\d+)", command)[1]
    assert f"http://127.0.0.1:{port}/health" in dockerfile.split("HEALTHCHECK", 1)[1]
    assert ".env" in read(".dockerignore").split()  # the token never goes into the image


def test_compose_reads_dotenv_and_keeps_the_data_in_a_volume():
    compose = read("docker-compose.yml")
    assert "env_file: .env" in compose
    assert "- taleweaver-data:/data" in compose
    assert '"127.0.0.1:8080:8080"' in compose
    active = [line for line in compose.splitlines() if not line.lstrip().startswith("#")]
    assert not any("postgres" in line for line in active)  # commented out


def test_the_service_unit_does_not_restart_a_bad_configuration():
    unit = read("deploy/taleweaver.service")
    assert "RestartPreventExitStatus=2" in unit and "Restart=on-failure" in unit
    assert "ExecStart=/opt/taleweaver/bin/taleweaver-bot" in unit
    assert "Environment=STORY_DATA_DIR=/var/lib/taleweaver" in unit


def test_licences_are_shipped():
    project = tomllib.loads(read("pyproject.toml"))["project"]
    assert project["license"] == "MIT" and "MIT License" in read("LICENSE")
    note = read("storyengine/models/tinystories-gpt2/LICENSE.md")
    assert "CDLA-Sharing-1.0" in note
    package_data = tomllib.loads(read("pyproject.toml"))["tool"]["setuptools"]["package-data"]
    assert "models/tinystories-gpt2/LICENSE.md" in package_data["storyengine"]
    assert not any(d.startswith("psutil") for d in project["dependencies"])
