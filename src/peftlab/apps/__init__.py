"""The applications on top of the library: recipes, the `peftlab` CLI, `peftlab compare` and
`peftlab serve`. Nothing in the library imports from here."""
