# Taleweaver's Discord bot on the CPU.
#   docker build -t taleweaver .
#   docker run -d --name taleweaver --env-file .env -v taleweaver-data:/data \
#     -p 127.0.0.1:8080:8080 taleweaver
# (or `docker compose up -d`, see docker-compose.yml). Stories, adapters and logs live
# in the /data volume; the settings come from .env, which is never copied into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY migrations ./migrations
COPY storyengine ./storyengine
COPY bot ./bot
# README's install line: torch pinned, its CPU build (PyPI's Linux build carries CUDA).
RUN pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --create-home --uid 10001 taleweaver \
    && mkdir /data && chown taleweaver:taleweaver /data

USER taleweaver
# matplotlib builds its font cache once, here, not at the first /storyadmin stats.
RUN python -c "import matplotlib.font_manager"
# The working directory is the volume too: whatever .env leaves empty, data lands there.
WORKDIR /data
VOLUME /data
EXPOSE 8080
# /health answers 200 when the gateway, the database and the generator are well.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
STOPSIGNAL SIGTERM
# An --env-file copied from .env.example sets these empty, which would switch the health
# server off: the container's own defaults fill them in. exec: the bot gets the signals.
CMD ["sh", "-c", "export STORY_DATA_DIR=\"${STORY_DATA_DIR:-/data}\" HF_HOME=\"${HF_HOME:-/data/huggingface}\" BOT_HEALTH_PORT=8080 BOT_HEALTH_HOST=\"${BOT_HEALTH_HOST:-0.0.0.0}\"; exec taleweaver-bot"]
