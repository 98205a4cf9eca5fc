"""One cog per area: stories (slash commands and buttons) and reaction feedback."""
