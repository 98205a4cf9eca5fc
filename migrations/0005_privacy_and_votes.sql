-- Votes belong to the message they were cast on, and forgotten users get an alias.
--
-- A reply longer than Discord's 2,000 characters is split over several messages that
-- all show one generation. A vote is now one row per message, user and emoji, so taking
-- a 👍 off one part leaves the 👍 on the other part. For training and statistics, the
-- `votes` view counts a user's emoji once per generation, however many parts carry it.
CREATE TABLE feedback_by_message (
    id             INTEGER PRIMARY KEY,
    generation_id  INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    message_id     TEXT NOT NULL DEFAULT '',   -- '' for votes recorded before 0005
    user_id        TEXT NOT NULL,
    emoji          TEXT NOT NULL,
    value          REAL NOT NULL,              -- +1 liked, -1 disliked, 0 neutral
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (message_id, generation_id, user_id, emoji)
);
-- Older votes go to the first message that shows their generation.
INSERT INTO feedback_by_message (id, generation_id, message_id, user_id, emoji, value, created_at)
SELECT f.id, f.generation_id,
       COALESCE((SELECT MIN(m.message_id) FROM story_messages m
                 WHERE m.generation_id = f.generation_id), ''),
       f.user_id, f.emoji, f.value, f.created_at
FROM feedback f;
DROP TABLE feedback;
ALTER TABLE feedback_by_message RENAME TO feedback;
CREATE INDEX feedback_user ON feedback (user_id);
CREATE INDEX feedback_created ON feedback (created_at);
CREATE INDEX feedback_generation ON feedback (generation_id);
CREATE INDEX story_messages_generation ON story_messages (generation_id);

CREATE VIEW votes AS
SELECT generation_id, user_id, emoji, MAX(value) AS value, MIN(created_at) AS created_at
FROM feedback GROUP BY generation_id, user_id, emoji;

-- Someone who asked to be forgotten keeps an alias: rows that must say who acts (the
-- owner of a companion story, a round-robin seat) hold the alias, never the id; only
-- this table links the two.
ALTER TABLE forgotten_users ADD COLUMN alias TEXT;
UPDATE forgotten_users SET alias = 'forgotten:' || lower(hex(randomblob(8))) WHERE alias IS NULL;
CREATE UNIQUE INDEX forgotten_users_alias ON forgotten_users (alias);
-- What forget-me left behind before this migration: ids in round-robin seats and in the
-- learning switch's audit column.
UPDATE players SET user_id = (SELECT f.alias FROM forgotten_users f WHERE f.user_id = players.user_id),
                   user_name = 'a former player', active = 0
WHERE user_id IN (SELECT user_id FROM forgotten_users);
UPDATE communities SET updated_by = (SELECT f.alias FROM forgotten_users f
                                     WHERE f.user_id = communities.updated_by)
WHERE updated_by IN (SELECT user_id FROM forgotten_users);
