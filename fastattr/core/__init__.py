"""The model-agnostic cores: integrated gradients over stacked rows, the Chefer recursion, quadrature,
backends, precision, option checks and length packing; nothing here knows a PyHealth model."""
