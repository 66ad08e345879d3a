"""Layer 0, the ground everything stands on: errors, atomic writes, presets, paths, provenance and artifact folders.

Imports nothing from labkit's other packages.
"""
