"""`make bench`: Garrison vs nginx vs Caddy vs the direct upstream, on one machine, in one run."""
