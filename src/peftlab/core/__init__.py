"""The machinery every method shares: sites, the one layer wrapper, the method contract and registry,
AdaptedModel and its routing, merging and reports, checkpoints. Imports nothing above itself."""
