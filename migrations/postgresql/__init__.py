"""The numbered migrations in PostgreSQL's dialect (`storyengine.migrations.postgresql`)."""
