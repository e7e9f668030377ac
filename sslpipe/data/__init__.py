"""Data preparation and labels: decoding and packing images, the workspace image cache,
ingesting a catalog, the labelled set, label resolution and Label Studio.
"""
