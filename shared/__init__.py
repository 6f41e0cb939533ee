"""The code every service, the client, the PKI tool and the tests share — one concept per subpackage.

x509 (what certificates say) ← tls (contexts and live trust) ← inbound (our side of a connection),
authz (may this caller come in), outbound (calling on), tokens (on whose behalf); observability for all.
Arrows point at what a subpackage may import; nothing imports upward, and nothing here imports `pki`.
"""
