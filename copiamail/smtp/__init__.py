"""SMTP delivery: sessions with pipelining, MX lookups, the embedded sink."""
