"""What several tests share: the fake Discord, tiny models, crash children."""
