"""DHCPv6 (RFC 8415) for IPv6 births: the codec, the decisions, the socket."""
