"""The agent's HTTPS API: mutual TLS, identity and groups from the client certificate."""
