"""ps_worker package."""
