"""Marionette: real-time streaming avatar engine (the `marionette` command lives in `marionette.cli`)."""

__version__ = "0.1.0"
