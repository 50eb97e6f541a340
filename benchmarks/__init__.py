"""Measurements against references taken in the same run: ``transport`` (bytes and time
per push and pull against raw TCP, gloo and torch RPC), ``sync_vs_async`` (the modes side by
side), ``vs_ddp``, ``load``; ``report`` writes the README's Results section from their JSON."""
