"""Taleweaver's Discord front end: a thin discord.py layer over `storyengine`."""
