-- The adapter registry: every trained LoRA adapter version, its status and its report,
-- and the training runs that made them.

CREATE TABLE adapters (
    version         INTEGER PRIMARY KEY,
    path            TEXT NOT NULL,          -- directory in peft's save_pretrained format
    status          TEXT NOT NULL DEFAULT 'candidate'
                    CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')),
    parent_version  INTEGER REFERENCES adapters (version),
    method          TEXT NOT NULL,          -- kto | dpo | sft | import
    metrics         TEXT NOT NULL DEFAULT '{}',   -- JSON: the gate's report
    data_counts     TEXT NOT NULL DEFAULT '{}',   -- JSON: examples trained on
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    promoted_at     TEXT
);
-- At most one promoted adapter: the one the storyteller serves.
CREATE UNIQUE INDEX adapters_one_promoted ON adapters (status) WHERE status = 'promoted';

CREATE TABLE training_runs (
    id           INTEGER PRIMARY KEY,
    method       TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    version      INTEGER REFERENCES adapters (version),
    data_until   INTEGER,                 -- the newest generation id its training data had
    log_path     TEXT,
    error        TEXT,
    started_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at  TEXT
);
