"""Models: importing the base, loading a stage's input and saving its output, the method registry, adapters."""
