"""Synthetic models and LoRAs generated from the layout data, and the demo that uses them."""
