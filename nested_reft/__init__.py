"""nested_reft."""
