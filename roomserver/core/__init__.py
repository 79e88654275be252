"""The pure core of roomserver: rooms, membership, sequence numbers, validation and stats.

Nothing in this package does I/O or imports Twisted, Autobahn, Redis or sqlite3 (a test walks the package and
fails on such an import). The adapters around it feed it data and carry out the effects it returns.
"""
