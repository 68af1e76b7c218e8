"""One module per op: argument checks, fake kernel, dispatching implementation, providers."""
