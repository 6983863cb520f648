"""Training jobs (run in worker processes): create now, pretraining next."""
