"""Peer servers for the benchmark: small servers speaking roomserver's room protocol with other libraries."""
