"""Load scenarios for Durable Streams servers (Streamhold and its peers): `python -m benchmarks.run`."""
