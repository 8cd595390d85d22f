"""HTTP pieces both stream APIs share: content reads, security headers, the guard, keys, metrics, ops."""
