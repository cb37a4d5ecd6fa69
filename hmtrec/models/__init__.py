"""Models. Each registers itself by name; adding a model is one new file plus its config defaults."""
