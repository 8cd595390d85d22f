"""The store: tables, statements, reads, group commit, transactions, chunk files, and their facade."""
