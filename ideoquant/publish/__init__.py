"""Publishing an output: `verify` it against its manifest, write its model card, `upload` it to the Hub."""
