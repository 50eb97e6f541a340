"""ps_server package."""
