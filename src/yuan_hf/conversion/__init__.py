"""Converters from IEIT's checkpoint formats to the native layout."""
