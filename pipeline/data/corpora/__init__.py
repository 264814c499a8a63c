"""Builders of real corpora as WebDataset shards (``diffin data NAME --out DIR``)."""

BUILDERS = ("openmoji", "openclipart", "fashion-mnist", "synthetic")  # the `diffin data` commands
