"""Pure-torch parts of the testbed: procedural captioned data, text encoder, attribute classifier, metrics."""
