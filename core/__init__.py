"""mipsec core: wire codecs, sans-I/O protocol machines, hooks, roles, launcher."""
