"""The Python stream API: the interface (base), in-process (local), over HTTP (remote), agent contexts."""
