"""The HTTP routes, one module per resource, and the helpers they share."""
