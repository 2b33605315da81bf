"""Write: sinks that take planned tensors one at a time, inside a staging folder renamed on success."""
