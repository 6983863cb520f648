"""Jobs: pure job states, and the worker processes that run them."""
