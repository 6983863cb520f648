"""Serving: instances on the control loop, engines on their own threads."""
