"""Numbered SQL migrations, shipped inside the package as `storyengine.migrations`."""
