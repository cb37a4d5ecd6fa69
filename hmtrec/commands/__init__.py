"""Command-line commands; every module here with a `register(app)` function is added to `hmtrec`."""
