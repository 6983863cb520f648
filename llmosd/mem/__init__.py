"""Devices and memory: what the daemon's hardware has and who may hold how much of it.

- ``devices``: device and dtype choice, a device's memory (imports torch);
- ``policy``: admission and eviction decisions on tables of holders (pure, no torch);
- ``estimate``: memory estimates of instances and jobs, corrected by measurements (no torch);
- ``budgets``: budget texts -> bytes per device, checked (no torch; ``config`` uses it);
- ``manager``: the ledger of charges per device and tier, plans on the
  ledger, recent evictions (the control loop's side; no torch).
"""
