"""Data layer: validated tables, the Taxonomy, canonical sequences, splits and readers."""
