-- Stories, their turns and notes, and every generation the model made.

CREATE TABLE channel_settings (
    channel     TEXT PRIMARY KEY,
    preset      TEXT,
    sampling    TEXT NOT NULL DEFAULT '{}',   -- JSON: overrides of the preset's parameters
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE stories (
    id            INTEGER PRIMARY KEY,
    channel       TEXT NOT NULL,
    premise       TEXT NOT NULL,
    genre         TEXT,
    mode          TEXT NOT NULL DEFAULT 'solo' CHECK (mode IN ('solo', 'round-robin', 'companion')),
    status        TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended')),
    memory        TEXT NOT NULL DEFAULT '',
    authors_note  TEXT NOT NULL DEFAULT '',
    created_by    TEXT,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ended_at      TEXT
);
-- One active story per channel, enforced by the database itself.
CREATE UNIQUE INDEX stories_one_active_per_channel ON stories (channel) WHERE status = 'active';

CREATE TABLE generations (
    id             INTEGER PRIMARY KEY,
    story_id       INTEGER REFERENCES stories (id) ON DELETE CASCADE,
    channel        TEXT,
    prompt         TEXT NOT NULL,
    output         TEXT NOT NULL,          -- what was shown (trimmed, filtered)
    raw_output     TEXT NOT NULL,          -- what the model produced
    params         TEXT NOT NULL,          -- JSON sampling parameters
    model_id       TEXT NOT NULL,
    adapter_id     TEXT,
    prompt_tokens  INTEGER NOT NULL,
    output_tokens  INTEGER NOT NULL,
    finish_reason  TEXT NOT NULL,          -- eos | length | cancelled | error
    latency_s      REAL NOT NULL,
    ttft_s         REAL,
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX generations_story ON generations (story_id);

CREATE TABLE turns (
    id             INTEGER PRIMARY KEY,
    story_id       INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    position       INTEGER NOT NULL,       -- order in the story; alternatives share one
    action         INTEGER NOT NULL,       -- turns added by one operation share one; undo removes the last
    kind           TEXT NOT NULL CHECK (kind IN ('user', 'bot')),
    author_id      TEXT,
    author_name    TEXT,
    text           TEXT NOT NULL,
    status         TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'replaced', 'undone')),
    generation_id  INTEGER REFERENCES generations (id),
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX turns_story_position ON turns (story_id, position);

CREATE TABLE lore_cards (
    id         INTEGER PRIMARY KEY,
    story_id   INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    triggers   TEXT NOT NULL,              -- JSON list of trigger words
    text       TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (story_id, name)
);
