-- Learning per community, reward models and best-of-n.
-- PostgreSQL version of migrations/0006_communities_and_rewards.sql. The app gives a
-- reward model's version itself (storage/training.py), so reward_models.version is a
-- plain BIGINT key, not an identity.
--
-- Adapters: each community (a Discord server) with learning on may grow its own lineage
-- of adapter versions, starting from the shared one; NULL is the shared lineage. At most
-- one promoted version per lineage.
ALTER TABLE adapters ADD COLUMN community TEXT;
DROP INDEX adapters_one_promoted;
CREATE UNIQUE INDEX adapters_one_promoted
    ON adapters (COALESCE(community, ''), status) WHERE status = 'promoted';
ALTER TABLE training_runs ADD COLUMN community TEXT;   -- NULL: the shared lineage

-- Reward models: a small scorer of continuations learned from reactions and choices;
-- versioned and promoted like adapters, per lineage.
CREATE TABLE reward_models (
    version      BIGINT PRIMARY KEY,
    community    TEXT,                     -- NULL: the shared one
    path         TEXT NOT NULL,            -- directory with the scorer's files
    status       TEXT NOT NULL DEFAULT 'candidate'
                 CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')),
    metrics      TEXT NOT NULL DEFAULT '{}',   -- JSON: held-out accuracy and the gate
    data_counts  TEXT NOT NULL DEFAULT '{}',
    created_at   TEXT NOT NULL DEFAULT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    promoted_at  TEXT
);
CREATE UNIQUE INDEX reward_models_one_promoted
    ON reward_models (COALESCE(community, ''), status) WHERE status = 'promoted';

-- Best-of-n: the candidates written for one turn share a group (the id of the shown
-- one); each carries the reward model's score.
ALTER TABLE generations ADD COLUMN reward DOUBLE PRECISION;
ALTER TABLE generations ADD COLUMN candidate_of BIGINT REFERENCES generations (id);
CREATE INDEX generations_candidate_of ON generations (candidate_of);

-- Preference pairs may be weighted (pairs the reward model labels count less than
-- people's).
ALTER TABLE preference_pairs ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1.0;
