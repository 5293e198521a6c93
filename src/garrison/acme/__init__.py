"""Public certificates from an ACME CA (RFC 8555), on certbot's `acme` library.

One module per job: `challenges` (the HTTP-01 token table the plain-HTTP listener serves),
`account` (the account key and registration, one per directory URL), `issue` (one order from
new key to stored chain), `storage` (the live certificate and its state file), `schedule` (when
to renew, and how long to back off), `alert` (the failure webhook), `manager` (one renewal
attempt with locking, state, metric and alert) and `renewer` (the gateway's background task).
"""
