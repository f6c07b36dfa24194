"""Behaviour-cloning configs."""
