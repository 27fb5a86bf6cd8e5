"""The evaluation store: sampled predictions with their inputs, late labels, model quality per time span."""
