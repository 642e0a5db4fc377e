"""Profiles shipped with plait (``Cluster.profile: NAME``); see README.md."""
