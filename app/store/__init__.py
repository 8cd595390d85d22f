"""The store: SQL tables and statements, group commit, transactions, chunk files, and the facade over them."""
