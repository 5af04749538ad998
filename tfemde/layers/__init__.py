"""Keras layers of tfemde (filled in as the layer modules land)."""
