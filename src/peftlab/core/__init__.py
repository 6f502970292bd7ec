"""Shared machinery every method uses: configs, target matching, wrapping, adapter state."""
