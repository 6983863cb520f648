"""Devices and memory: device/dtype choice (later budgets and eviction)."""
