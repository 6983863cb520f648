"""Request handlers, split by domain; run on the control loop, never import torch."""
