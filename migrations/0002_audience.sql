-- The audience: round-robin players and turns, the messages that carry generations,
-- reactions, choices between alternatives, preference pairs, and people who asked to
-- be forgotten.

ALTER TABLE stories ADD COLUMN current_seat INTEGER;       -- round-robin: whose turn (a seat)
ALTER TABLE stories ADD COLUMN turn_deadline REAL;         -- unix time the turn passes by itself
ALTER TABLE channel_settings ADD COLUMN turn_timeout_s INTEGER;  -- NULL: the default
ALTER TABLE turns ADD COLUMN train_excluded INTEGER NOT NULL DEFAULT 0;

CREATE TABLE players (
    story_id   INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    seat       INTEGER NOT NULL,           -- join order; turns rotate through active seats
    active     INTEGER NOT NULL DEFAULT 1,
    joined_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (story_id, user_id),
    UNIQUE (story_id, seat)
);

CREATE TABLE story_messages (
    message_id     TEXT PRIMARY KEY,       -- the front end's message id (a Discord snowflake)
    generation_id  INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE feedback (
    id             INTEGER PRIMARY KEY,
    generation_id  INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    user_id        TEXT NOT NULL,
    emoji          TEXT NOT NULL,
    value          REAL NOT NULL,          -- +1 liked, -1 disliked, 0 neutral
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (generation_id, user_id, emoji)
);
CREATE INDEX feedback_user ON feedback (user_id);

CREATE TABLE choices (
    id          INTEGER PRIMARY KEY,
    story_id    INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    action      INTEGER NOT NULL,
    user_id     TEXT,
    status      TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'chosen', 'expired')),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE choice_options (
    choice_id      INTEGER NOT NULL REFERENCES choices (id) ON DELETE CASCADE,
    position       INTEGER NOT NULL,
    generation_id  INTEGER NOT NULL REFERENCES generations (id),
    PRIMARY KEY (choice_id, position)
);

CREATE TABLE preference_pairs (
    id                      INTEGER PRIMARY KEY,
    chosen_generation_id    INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    rejected_generation_id  INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    user_id                 TEXT,
    source                  TEXT NOT NULL,   -- choice (companion buttons), ...
    created_at              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE forgotten_users (
    user_id     TEXT PRIMARY KEY,            -- never recorded again, never trained on
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
