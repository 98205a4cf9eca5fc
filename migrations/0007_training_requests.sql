-- Training on another machine: a front end with TRAIN_MODE=external records that a
-- round is due; `storyengine train worker` (on a GPU box, sharing the database) takes
-- the oldest request, runs the round and notes how it ended.
CREATE TABLE training_requests (
    id            INTEGER PRIMARY KEY,
    community     TEXT,                    -- the lineage to train; NULL: the shared one
    reason        TEXT NOT NULL,
    requested_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    taken_at      TEXT,
    taken_by      TEXT,                    -- the worker (host and pid)
    finished_at   TEXT,
    outcome       TEXT
);
CREATE INDEX training_requests_open ON training_requests (taken_at, id);
