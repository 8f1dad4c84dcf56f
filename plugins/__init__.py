"""Built-in mipsec plugins; each registers through the ``mipsec`` entry-point group."""
