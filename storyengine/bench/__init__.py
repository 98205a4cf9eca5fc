"""Benchmarks that print figures: `storyengine bench serve|learning|soak`."""
