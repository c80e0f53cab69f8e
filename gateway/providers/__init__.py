"""Backends: one small class per upstream behind the `Provider` protocol."""
