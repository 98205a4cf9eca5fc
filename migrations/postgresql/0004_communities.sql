-- Learning is opt-in per community. A story remembers the community it was told in (a
-- Discord server's id, 'dm' for a direct-message session, NULL for a story told through
-- the CLI or the library by the operator); the datasets train on a community's stories
-- only while its learning is on.
-- PostgreSQL version of migrations/0004_communities.sql.

ALTER TABLE stories ADD COLUMN community TEXT;
-- Stories told before this migration in a Discord channel (a channel id is all digits)
-- came from a server or a DM that never had the chance to opt in: they get a community
-- no one can switch on, so they are never trained on. (SQLite: channel != '' AND channel
-- NOT GLOB '*[^0-9]*', i.e. non-empty and nothing but the digits 0-9.)
UPDATE stories SET community = 'before-opt-in' WHERE channel <> '' AND channel !~ '[^0-9]';
CREATE INDEX stories_community ON stories (community);

CREATE TABLE communities (
    id          TEXT PRIMARY KEY,
    learning    INTEGER NOT NULL DEFAULT 0,   -- 1: its stories and reactions may be trained on
    updated_by  TEXT,
    updated_at  TEXT NOT NULL DEFAULT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
);

CREATE INDEX feedback_created ON feedback (created_at);
