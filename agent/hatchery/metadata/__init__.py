"""The metadata service on 169.254.169.254: per-bridge namespace, anti-spoofing, the server."""
